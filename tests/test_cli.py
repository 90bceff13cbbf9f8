import json
import sys

import nbformat
import pandas as pd
import pytest

from sodlib.cli import main


def test_data_synth_stats_and_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(["data", "synth", "--out", str(out), "--split", "val", "--num-images", "3", "--size", "128"])
        == 0
    )
    ann = out / "annotations" / "instances_val.json"
    assert len(list((out / "images" / "val").glob("*.png"))) == 3
    png = tmp_path / "stats.png"
    assert main(["data", "stats", str(ann), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    before = png.read_bytes()
    capsys.readouterr()
    assert (
        main(["data", "stats", str(ann), "--out", str(png)]) == 2
    )  # an existing --out is the user's: refused
    assert f"{png} exists; choose another --out" in capsys.readouterr().err and png.read_bytes() == before

    gt = json.loads(ann.read_text())
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(dets))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--gt",
                str(ann),
                "--dets",
                str(dets_path),
                "--protocol",
                "coco",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert "AP50" in capsys.readouterr().out
    metrics = pd.read_csv(tmp_path / "ev" / "metrics.csv").set_index("metric")["value"]
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    # without --out: eval_coco/ beside the detections, under the same rule as --out (a user's files are
    # never replaced)
    assert main(["eval", "--gt", str(ann), "--dets", str(dets_path), "--protocol", "coco"]) == 0
    assert (tmp_path / "eval_coco" / "metrics.csv").is_file()
    assert (
        main(["eval", "--gt", str(ann), "--dets", str(dets_path), "--protocol", "coco"]) == 0
    )  # ours: reused
    mine = tmp_path / "eval_sodad"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my own numbers\n")
    capsys.readouterr()
    assert main(["eval", "--gt", str(ann), "--dets", str(dets_path), "--protocol", "sodad"]) == 2
    assert (
        "the output folder" in capsys.readouterr().err
        and (mine / "metrics.csv").read_text() == "my own numbers\n"
    )


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["eval", "--gt", str(missing), "--dets", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "Traceback" not in err
    assert main(["train", "--profile", "smoke", "--set", "loss.beta=3"]) == 2
    assert "loss.beta" in capsys.readouterr().err


def test_papermill_uses_the_project_interpreter_without_kernel_registration(tmp_path):
    """papermill's default python3 kernel must run in this environment (no `ipykernel install`)."""
    import papermill

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('X: str = "unset"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import sys, sodlib\nprint(sys.executable)\nprint(X)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, dst = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    papermill.execute_notebook(str(src), str(dst), parameters={"X": "set"}, progress_bar=False)
    outputs = "".join(
        o.get("text", "") for c in nbformat.read(dst, 4).cells if c.cell_type == "code" for o in c.outputs
    )
    assert sys.executable in outputs and "set" in outputs


def test_ctrl_c_exits_130_naming_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    import sodlib.training.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sodlib.training.engine, "train", interrupted)
    assert main(["train", "--profile", "smoke", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err  # interrupted before the first checkpoint: no folder to name
    assert (
        "interrupted; no checkpoint was written yet" in err
        and not (tmp_path / "run" / "checkpoints").exists()
    )
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["train", "--profile", "smoke", "--out", str(tmp_path / "run")]) == 130
    assert (
        f"interrupted; the last checkpoint is in {tmp_path / 'run' / 'checkpoints'}"
        in capsys.readouterr().err
    )


def test_any_failure_is_one_line_and_exit_2_unless_debugging(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["eval", "--checkpoint", str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "sodlib eval: error:" in err
    monkeypatch.setenv("SODLIB_DEBUG", "1")
    with pytest.raises(Exception):  # noqa: B017 - whichever error torch raises, it is not swallowed
        main(["eval", "--checkpoint", str(bad), "--out", str(tmp_path / "ev")])


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", "c.pt", "--out", str(mine)]) == 2
    assert main(["eval", "--gt", "g.json", "--dets", "d.json", "--out", str(mine)]) == 2
    assert capsys.readouterr().err.count("is a file, not a folder") == 2
    assert mine.read_text() == "mine"


def test_an_out_folder_with_someone_elses_files_is_refused(tmp_path, capsys):
    from sodlib.io import OUTPUT_MARK, claim_output_dir

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "predictions.json").write_text("their work")
    assert main(["eval", "--gt", "g.json", "--dets", "d.json", "--out", str(theirs)]) == 2
    assert "holds files sodlib did not write" in capsys.readouterr().err
    assert (theirs / "predictions.json").read_text() == "their work" and not (theirs / OUTPUT_MARK).exists()
    ours = claim_output_dir(tmp_path / "new" / "out")  # created and marked; reused afterwards
    (ours / "metrics.csv").write_text("x")
    assert claim_output_dir(ours) == ours
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (claim_output_dir(empty) / OUTPUT_MARK).exists()


def test_bad_json_and_foreign_checkpoints_are_named(tmp_path, capsys):
    import torch

    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3}, foreign)
    cases = [
        ["eval", "--gt", str(bad), "--dets", str(bad), "--out", str(tmp_path / "e")],
        ["data", "stats", str(bad), "--out", str(tmp_path / "s.png")],
        ["eval", "--checkpoint", str(foreign), "--out", str(tmp_path / "e2")],
        ["predict", str(bad), "--checkpoint", str(foreign), "--out", str(tmp_path / "p")],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and (
            f"{bad}: not valid JSON" in err or f"{foreign}: not a sodlib checkpoint" in err
        ), err
