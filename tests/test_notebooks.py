"""Notebooks: every one runs under papermill with PROFILE="smoke"; committed copies are clean; the runner
(and `sodlib reproduce`) name the notebook and cell that failed."""

import ast
import re
from pathlib import Path

import nbformat
import pytest

from sodlib.cli import main as cli_main
from sodlib.studies import notebooks

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = notebooks.discover(NOTEBOOKS_DIR)
# what each notebook must leave under OUT_DIR/figures/, and lines its printed output must contain
EXPECTED_FIGURES = {
    "01_scale_aligned_target": [
        "st_u_rho.png",
        "st_fig3_example.png",
        "st_v_theta.png",
        "st_c_beta.png",
        "st_fixed_point.png",
        "sr_eq19_direction.png",
    ],
    "02_sample_point_refinement": ["spr_geometry.png"],
    "03_training": ["training_curves_smoke.png", "predictions_smoke.png"],
    "04_ablations": ["ablations_smoke.png", "mechanisms_smoke.png"],
    "05_heatmaps": ["figure5_in_box_smoke.png", "heatmaps_smoke.png", "heatmaps_explorer_smoke.png"],
    "06_mrqm": ["mrqm_query_heatmap_smoke.png", "mrqm_positives_per_gt_smoke.png"],
    "07_real_data": ["real_data_neon_smoke.png", "real_data_neon_heatmaps_smoke.png"],
}
EXPECTED_TEXT = {
    "01_scale_aligned_target": [
        "rho always in [u, 1/u]: True",
        "r is increasing in |t - s| for every w: True",
    ],
    "02_sample_point_refinement": ["matched queries"],
    "03_training": ["sodad APeS"],
    "04_ablations": [
        "Table 3 · ST / SR / SPR combinations: ",
        "comparisons are resolved",
        "Resolution:",
        "Holm's first step over",
        "Mechanisms: ",
    ],
    "05_heatmaps": [
        "in-box attention share, last decoder layer: baseline",
        "In-box attention share at the last decoder layer",
    ],
    "06_mrqm": ["positives per GT"],
    "07_real_data": ["neon_trees test tile", "ST+SR+SPR − baseline (bundled), AP points over"],
}
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9_]*$")


@pytest.fixture
def one_thread_kernel(monkeypatch):
    """The kernel inherits the environment: one thread, SODLIB_DATA already a temp folder (conftest)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _outputs_text(path: Path) -> str:
    parts = []
    for cell in nbformat.read(path, as_version=4).cells:
        for out in cell.get("outputs", []):
            parts.append(
                out.get("text", "") + out.get("data", {}).get("text/plain", "") + out.get("evalue", "")
            )
    return "\n".join(parts)


def _notebook(path: Path, sources: list[str]) -> Path:
    """A notebook whose cells are `sources`: '#md ' starts a markdown cell, '#parameters' tags the cell."""
    nb = nbformat.v4.new_notebook()
    for src in sources:
        if src.startswith("#md "):
            nb.cells.append(nbformat.v4.new_markdown_cell(src[4:]))
        else:
            tags = ["parameters"] if src.startswith("#parameters") else []
            nb.cells.append(nbformat.v4.new_code_cell(src, metadata={"tags": tags}))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


PARAMS = '#parameters\nPROFILE: str = "cpu"  # smoke | cpu\nOUT_DIR: str = "."  # results folder'


def test_notebooks_exist_and_each_has_expectations():
    assert [p.stem for p in NOTEBOOKS][:2] == ["01_scale_aligned_target", "02_sample_point_refinement"]
    missing = [p.name for p in NOTEBOOKS if p.stem not in EXPECTED_FIGURES]
    assert not missing, f"add the figures of {missing} to EXPECTED_FIGURES"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_with_smoke_profile(path, tmp_path, one_thread_kernel):
    params = notebooks.notebook_parameters("smoke", tmp_path, seeds=1)
    executed = notebooks.run_notebook(path, tmp_path / "notebooks" / path.name, params, progress=False)
    assert executed == tmp_path / "notebooks" / path.name
    for name in EXPECTED_FIGURES[path.stem]:
        figure = tmp_path / "figures" / name
        assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG", f"{path.name} did not write {name}"
    text = _outputs_text(executed)
    for line in EXPECTED_TEXT.get(path.stem, []):
        assert line in text, f"{path.name}: {line!r} not in its output"
    assert not list((tmp_path / "notebooks").glob(".*"))  # the temporary copy was renamed, not left behind


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert notebooks.unstripped_cells(nb) == [], (
        f"{path.name}: run `make strip` (python -m sodlib.studies.notebooks)"
    )
    assert "papermill" not in nb.metadata
    assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameters_cell_holds_typed_literals(path):
    cells = notebooks.parameters_cells(nbformat.read(path, as_version=4))
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    source = cells[0].source
    names = []
    for stmt in ast.parse(source).body:  # only `NAME: type = literal`, no calls, no I/O
        assert isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name), ast.dump(stmt)
        assert isinstance(stmt.value, ast.Constant), f"{path.name}: {stmt.target.id} is not a literal"
        assert UPPER_SNAKE.match(stmt.target.id)
        names.append(stmt.target.id)
    assert set(notebooks.PARAMETER_NAMES) <= set(names)
    for line in filter(str.strip, source.splitlines()):
        assert "#" in line, f"{path.name}: parameter line without a comment on its values: {line!r}"
        assert line.count("=") == 1, f"{path.name}: papermill cannot parse {line!r} (one '=' per line)"


def test_discover_orders_and_filters(tmp_path):
    for name in ("10_b.ipynb", "02_a.ipynb", "scratch.ipynb", "3_c.ipynb", "04_d.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in notebooks.discover(tmp_path)] == ["02_a.ipynb", "10_b.ipynb"]
    with pytest.raises(FileNotFoundError, match="nope"):
        notebooks.discover(tmp_path / "nope")


def test_strip_outputs(tmp_path):
    path = _notebook(tmp_path / "01_x.ipynb", ["#md title", PARAMS, "print(PROFILE)"])
    executed = notebooks.run_notebook(
        path, tmp_path / "out" / "01_x.ipynb", {"PROFILE": "smoke"}, progress=False
    )
    nb = nbformat.read(executed, as_version=4)
    assert notebooks.unstripped_cells(nb) and "smoke" in _outputs_text(executed)
    assert notebooks.strip_outputs(executed) is True
    clean = nbformat.read(executed, as_version=4)
    assert notebooks.unstripped_cells(clean) == [] and "papermill" not in clean.metadata
    assert [c.source for c in clean.cells] == [c.source for c in nbformat.read(path, as_version=4).cells]
    assert notebooks.strip_outputs(executed) is False


def test_failure_names_notebook_and_cell(tmp_path):
    path = _notebook(
        tmp_path / "nbs" / "07_broken.ipynb",
        ["#md intro", PARAMS, "x = 1", "#md the next cell fails", "raise ValueError(f'boom {PROFILE}')"],
    )
    dst = tmp_path / "results" / "notebooks" / "07_broken.ipynb"
    dst.parent.mkdir(parents=True)
    dst.write_text("previous good copy")
    with pytest.raises(notebooks.NotebookError) as info:
        notebooks.run_notebook(path, dst, {"PROFILE": "smoke"}, progress=False)
    message = str(info.value)
    assert message.startswith("nbs/07_broken.ipynb cell 5: ValueError: boom smoke"), message
    assert "\n" not in message and info.value.cell == 5
    assert dst.read_text() == "previous good copy"  # never half-written, never replaced by a failure
    failed = dst.with_suffix(".failed.ipynb")
    assert failed.is_file() and str(failed) in message
    assert "boom smoke" in _outputs_text(failed)


@pytest.mark.parametrize(
    "cells, where",
    [
        ([PARAMS, "1 / 0"], "cell 2"),  # right after the injected cell
        (["#md a", "#md b", PARAMS, "y = 2", "#md c", "1 / 0"], "cell 6"),
    ],
)
def test_failing_cell_number_counts_source_cells(tmp_path, cells, where):
    path = _notebook(tmp_path / "nbs" / "09_x.ipynb", cells)
    with pytest.raises(notebooks.NotebookError, match=f"^nbs/09_x.ipynb {where}: ZeroDivisionError"):
        notebooks.run_notebook(path, tmp_path / "out.ipynb", {"PROFILE": "smoke"}, progress=False)


def test_missing_parameters_cell_is_named(tmp_path):
    path = _notebook(tmp_path / "nbs" / "08_noparams.ipynb", ["print(1)"])
    with pytest.raises(
        notebooks.NotebookError, match="nbs/08_noparams.ipynb: expected exactly one cell tagged"
    ):
        notebooks.run_notebook(path, tmp_path / "out.ipynb", {"PROFILE": "smoke"}, progress=False)
    assert not (tmp_path / "out.ipynb").exists()


def test_reproduce_runs_notebook_steps_and_fails_with_one_line(tmp_path, monkeypatch, capsys):
    import sodlib.studies.reproduce

    nbs = tmp_path / "nbs"
    _notebook(
        nbs / "06_ok.ipynb",
        [
            PARAMS + '\nSEEDS: int = 1  # seeds\nDATA: str = ""  # root\nDEVICE: str = ""  # device',
            "print(PROFILE, SEEDS, OUT_DIR)",
        ],
    )
    _notebook(nbs / "07_broken.ipynb", [PARAMS, "#md prose", "1 / 0"])
    monkeypatch.setattr(sodlib.studies.reproduce, "NOTEBOOKS_DIR", nbs)
    out = tmp_path / "results"

    assert (
        cli_main(["reproduce", "--profile", "smoke", "--only", "06", "--seeds", "3", "--out", str(out)]) == 0
    )
    assert f"smoke 3 {out.resolve()}" in _outputs_text(out / "notebooks" / "06_ok.ipynb")
    assert "[reproduce] 06_ok" in capsys.readouterr().out

    assert cli_main(["reproduce", "--profile", "smoke", "--only", "07", "--out", str(out)]) == 2
    err = (
        capsys.readouterr().err.strip().splitlines()[-1]
    )  # papermill's progress bar and kernel logs precede it
    assert err.startswith("sodlib reproduce: error: ") and "Traceback" not in err
    assert "step 07_broken failed: nbs/07_broken.ipynb cell 3: ZeroDivisionError: division by zero" in err, (
        err
    )

    assert cli_main(["reproduce", "--profile", "smoke", "--only", "99", "--out", str(out)]) == 2
    assert "matches no step" in capsys.readouterr().err


def test_reproduce_default_steps_leave_out_the_opt_in_steps(tmp_path, monkeypatch):
    import sodlib.studies.experiments as exp
    import sodlib.studies.reproduce as rep

    calls = []
    for module, name in (
        (rep, "step_data"),
        (rep, "step_baseline"),
        (exp, "step_sr_grad"),
        (exp, "step_budget"),
    ):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: calls.append(name))
    assert rep.main("smoke", results_dir=tmp_path, notebooks_dir=tmp_path / "absent") == 0
    assert calls == ["step_data", "step_baseline"]
    calls.clear()
    assert rep.main("smoke", only="00_sr", results_dir=tmp_path, notebooks_dir=tmp_path / "absent") == 0
    assert calls == ["step_sr_grad"]
    calls.clear()
    assert rep.main("smoke", only="00_baseline", results_dir=tmp_path, notebooks_dir=tmp_path / "absent") == 0
    assert calls == ["step_baseline"]


def test_step_budget_scales_iterations_and_tabulates_every_variant(tmp_path, monkeypatch):
    import pandas as pd

    import sodlib.studies.experiments as rep
    import sodlib.training.engine

    seen = {}

    def fake_train(cfg, out, protocol):
        seen[out.name] = cfg
        return {
            "iterations": cfg.train.max_iters,
            "train_seconds": 1.0,
            "AP": 0.1,
            "AP50": 0.2,
            "AP75": 0.1,
            "APS": 0.1,
            "APM": 0.2,
        }

    monkeypatch.setattr(sodlib.training.engine, "train", fake_train)
    table = rep.step_budget("cpu", tmp_path)
    assert list(table["variant"]) == list(rep.BUDGET_VARIANTS)
    iters = dict(zip(table["variant"], table["iterations"]))
    assert (
        iters["baseline"] == 520 and iters["3 decoder layers"] == 440 and iters["ResNet-18 backbone"] == 280
    )
    assert iters["stride-4 value level"] == 385 and iters["stride-4 value level, same iterations"] == 520
    assert len(seen) == len(rep.BUDGET_VARIANTS)  # one run folder (config hash) per variant
    p2 = [cfg for cfg in seen.values() if cfg.model.p2_values]
    assert sorted(cfg.train.max_iters for cfg in p2) == [385, 520] and {
        cfg.model.num_levels for cfg in p2
    } == {4}
    assert pd.read_csv(tmp_path / "tables" / "baseline_budget.csv").shape == (len(rep.BUDGET_VARIANTS), 8)


def test_step_sr_grad_writes_the_paired_differences_of_both_modes(tmp_path, monkeypatch):
    import pandas as pd

    import sodlib.studies.experiments as rep
    import sodlib.training.engine

    ap = {(False, "difficulty"): 0.40, (True, "difficulty"): 0.42, (True, "end_to_end"): 0.41}

    def fake_train(cfg, out, protocol):
        a = ap[(cfg.loss.sr, cfg.loss.sr_grad)] + cfg.train.seed / 100
        return {"AP": a, "AP50": 2 * a, "AP75": a, "APS": a, "APM": a}

    monkeypatch.setattr(sodlib.training.engine, "train", fake_train)
    rep.step_sr_grad("cpu", tmp_path, seeds=2)
    pairs = pd.read_csv(tmp_path / "tables" / "sr_grad_pairs.csv")
    names = list(rep.SR_GRAD_VARIANTS)
    assert list(zip(pairs["variant"], pairs["vs"])) == [
        (names[1], names[0]), (names[1], names[0]), (names[2], names[0]), (names[2], names[0]),
        (names[1], names[2]), (names[1], names[2]),
    ]  # fmt: skip
    assert pairs["diff"].tolist() == pytest.approx([2.0, 4.0, 1.0, 2.0, 1.0, 2.0], abs=1e-3)  # AP, AP50 ×100
    assert (pairs["pairs"] == 2).all() and pairs["ci95_low"].tolist() == pytest.approx(
        pairs["diff"].tolist(), abs=1e-3
    )


def test_step_baseline_records_the_post_nms_diagnostic_and_reuses_it(tmp_path):
    import json

    import sodlib.studies.reproduce as rep

    summary = rep.step_baseline("smoke", tmp_path)
    stored = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    post = stored["with_post_nms"]
    assert post["post_nms"] == rep.POST_NMS_IOU and set(rep.BASELINE_METRICS) <= set(post)
    assert 0 <= post["AP50"] <= 1 and stored["AP50"] == summary["AP50"] and stored["iterations"] == 8
    run = tmp_path / stored["run_dir"]
    assert json.loads((run / "metrics_post_nms.json").read_text()) == post
    # a fresh clone has the run's metrics but no checkpoint: nothing is retrained, the diagnostic is reused
    (run / "checkpoints" / "last.pt").unlink()
    assert rep.step_baseline("smoke", tmp_path)["with_post_nms"] == post
    assert not (run / "checkpoints" / "last.pt").exists()
