"""The stale-run guards: each code path's first losses, and committed runs retrained a few steps, must come
back as recorded on this kind of machine; on an unrecorded kind the first step must agree and the later size
is reported."""

import json
import warnings

import pytest

from sodlib.hardware import machine_kind
from sodlib.io import SOURCE_ROOT
from sodlib.studies import drift

RESULTS = SOURCE_ROOT / "results"  # the committed runs and records, not the tests' folder
RECORD_HINT = "regenerate the affected runs, then `python -m sodlib.studies.drift --record`"


@pytest.mark.parametrize("path", sorted(drift.PATHS))
def test_code_path_matches_recorded_losses(path):
    recorded = drift.recorded_by_kind(RESULTS / "drift.json", "paths", path)
    assert recorded, f"results/drift.json records no machine for code path {path!r}"
    kind = machine_kind()
    ref_kind = kind if kind in recorded else min(recorded)
    current = drift.first_losses(path)
    assert len(current) == drift.ITERATIONS
    problems, note = drift.check(recorded[ref_kind], ref_kind, recorded, current, kind)
    if note:
        warnings.warn(f"code path {path!r}: {note}", stacklevel=1)
    assert not problems, (
        f"code path {path!r} no longer gives the losses recorded on {ref_kind} "
        f"({'; '.join(problems[:3])}): the committed runs of this path are stale; {RECORD_HINT}"
    )


@pytest.mark.parametrize("path", sorted(drift.COMMITTED_RUNS))
def test_committed_run_retrains_to_its_own_log(path):
    reference, ref_kind = drift.committed_losses(path, RESULTS)
    recorded = drift.recorded_by_kind(RESULTS / "drift_committed.json", "runs", path)
    current = drift.retrain_committed(path, RESULTS)
    problems, note = drift.check(reference, ref_kind, recorded, current, machine_kind())
    if note:
        warnings.warn(f"committed run {drift.COMMITTED_RUNS[path]} ({path}): {note}", stacklevel=1)
    assert not problems, (
        f"committed run {drift.COMMITTED_RUNS[path]} ({path}) does not retrain to what this kind "
        f"of machine recorded ({'; '.join(problems[:3])}); {RECORD_HINT}"
    )


def test_committed_runs_exist_and_name_their_path():
    record = json.loads((RESULTS / "drift_committed.json").read_text())
    assert record["run_of"] == drift.COMMITTED_RUNS
    for path in drift.COMMITTED_RUNS:
        rows, _ = drift.committed_losses(path, RESULTS)
        assert [r[0] for r in rows] == [1.0, float(drift.COMMITTED_ITERATIONS)]


def test_mismatches_reports_a_moved_value():
    rec = [[1.0, 10.0, 2.0], [2.0, 9.0, 1.5]]
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.0, 1.5]]) == []
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.0001, 1.5]]) == [
        "iteration 2, column 1: 9.0001 vs recorded 9"
    ]  # exact by default
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.0001, 1.5]], rtol=1e-3) == []
    assert drift.mismatches(rec, rec[:1]) == ["1 logged iterations, recorded 2"]


def test_check_is_exact_on_recorded_kinds_and_reports_the_size_elsewhere():
    ref = [[1.0, 20.0, 5.0], [10.0, 18.0, 4.0]]
    here = [[1.0, 20.0, 5.0], [10.0, 18.018, 4.01]]  # another kind of machine: step 1 agrees, step 10 parts
    # the run's own kind: exact
    assert drift.check(ref, "A", {}, ref, "A") == ([], "")
    problems, _ = drift.check(ref, "A", {}, here, "A")
    assert problems == [
        "iteration 10, column 1: 18.018 vs recorded 18",
        "iteration 10, column 2: 4.01 vs recorded 4",
    ]
    # a recorded other kind: exact against its record, the size against the reference reported
    problems, note = drift.check(ref, "A", {"B": here}, here, "B")
    assert problems == [] and "differs by 1.0e-03 (relative) at iteration 10" in note
    assert drift.check(ref, "A", {"B": here}, ref, "B")[
        0
    ]  # B recorded `here`: the reference values are wrong
    # an unrecorded kind: iteration 1 within FIRST_STEP_RTOL, the rest reported
    problems, note = drift.check(ref, "A", {}, here, "C")
    assert problems == [] and note.startswith("kind of machine not recorded") and "--record" in note
    moved = [[1.0, 20.01, 5.0], [10.0, 18.0, 4.0]]  # the first step moved: code, not the machine
    assert drift.check(ref, "A", {}, moved, "C")[0] == ["iteration 1, column 1: 20.01 vs recorded 20"]


def test_largest_difference_names_the_iteration():
    assert drift.largest_difference([[1.0, 10.0], [10.0, 8.0]], [[1.0, 10.0], [10.0, 8.08]]) == (
        10.0,
        pytest.approx(0.01),
    )


def test_guard_config_and_committed_run_reject_unknown_path():
    with pytest.raises(ValueError, match="unknown code path 'nope'"):
        drift.guard_config("nope")
    with pytest.raises(ValueError, match="unknown code path 'nope'"):
        drift.committed_run("nope")


def test_recording_some_paths_keeps_this_kinds_other_records(tmp_path):
    path = tmp_path / "drift_committed.json"
    kind = machine_kind()
    path.write_text(
        json.dumps({"machines": {kind: {"runs": {"a": [[1.0, 2.0]]}}, "other": {"runs": {"a": [[9.0]]}}}})
    )
    kept = drift._merge_record(path, "runs", {"b": [[1.0, 3.0]]}, {"iterations": 10}, keep=True)
    assert kept["machines"][kind]["runs"] == {"a": [[1.0, 2.0]], "b": [[1.0, 3.0]]}
    assert kept["machines"]["other"] == {"runs": {"a": [[9.0]]}} and kept["iterations"] == 10
    assert drift._merge_record(path, "runs", {"b": [[1.0, 3.0]]}, {})["machines"][kind]["runs"] == {
        "b": [[1.0, 3.0]]
    }
    with pytest.raises(ValueError, match="unknown code path 'nope'"):
        drift.record(tmp_path, committed=["nope"])


def test_machine_table_compares_whole_retrains_with_the_committed_runs(tmp_path):
    from sodlib.config import get_profile, override

    def run(folder, seed, ap, kind=None):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(
            json.dumps(override(get_profile("smoke"), f"train.seed={seed}").to_dict())
        )
        (folder / "metrics.json").write_text(json.dumps({"AP": ap}))
        (folder / "provenance.json").write_text(json.dumps({"machine_kind": kind} if kind else {}))

    for seed, ap in enumerate((0.40, 0.42, 0.44)):
        run(tmp_path / "runs" / f"r{seed}", seed, ap)
    run(drift.machine_folder(tmp_path, "Vendor x86_64 AVX2") / "runs" / "r0", 0, 0.41, "Vendor x86_64 AVX2")
    table = drift.machine_table(tmp_path)
    assert table.to_dict("records") == [
        {
            "run": "r0",
            "committed_on": drift.UNRECORDED,
            "retrained_on": "Vendor x86_64 AVX2",
            "AP_committed": 0.40,
            "AP_retrained": 0.41,
            "dAP": pytest.approx(0.01),
            "seed_std_AP": pytest.approx(0.02),
            "seeds": 3,
        }
    ]
    assert drift.machine_folder(tmp_path, "Vendor x86_64 AVX2").name == "Vendor_x86_64_AVX2"
    with pytest.raises(ValueError, match="no committed run there"):
        drift.retrain_whole("nope", tmp_path)
