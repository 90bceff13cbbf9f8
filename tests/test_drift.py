"""The stale-run guard: each code path's first logged losses must equal those recorded with the runs."""

import json

import pytest

from sodlib.studies import drift
from sodlib.training.runs import default_results_dir

RECORDED = default_results_dir() / "drift.json"


@pytest.mark.parametrize("path", sorted(drift.PATHS))
def test_code_path_matches_recorded_losses(path):
    recorded = json.loads(RECORDED.read_text())
    current = drift.first_losses(path)
    assert len(current) == drift.ITERATIONS
    problems = drift.mismatches(recorded["paths"][path], current, recorded["rtol"])
    assert not problems, (
        f"code path {path!r} no longer gives the losses recorded at {recorded['code']} "
        f"({'; '.join(problems[:3])}): the committed runs of this path are stale. Regenerate them, then "
        f"`python -m sodlib.studies.drift --record`.")


def test_mismatches_reports_a_moved_value():
    rec = [[1.0, 10.0, 2.0], [2.0, 9.0, 1.5]]
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.0, 1.5]]) == []
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.0001, 1.5]]) == []  # within 1e-3
    assert drift.mismatches(rec, [[1.0, 10.0, 2.0], [2.0, 9.1, 1.5]]) == ["iteration 2, column 1: 9.1 vs recorded 9"]
    assert drift.mismatches(rec, rec[:1]) == ["1 logged iterations, recorded 2"]


def test_guard_config_rejects_unknown_path():
    with pytest.raises(ValueError, match="unknown code path 'nope'"):
        drift.guard_config("nope")
