"""`sodlib compare`: a regenerated results/ against the committed one, each kind of change named."""

import io
import json
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from sodlib import cli
from sodlib.config import get_profile
from sodlib.studies.compare import compare, compare_bytes
from sodlib.training.runs import config_hash

LOG = (
    "iteration,lr,loss,images_per_s,train_seconds\n1,0.001,14.4647,7.745,0.52\n10,0.002,13.5222,10.548,3.97\n"
)


def _png(value: float, software: str = "a") -> bytes:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, value])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": software})
    plt.close(fig)
    return buf.getvalue()


def _notebook(*texts: str) -> bytes:
    cells = [
        {
            "cell_type": "code",
            "execution_count": i,
            "metadata": {},
            "source": "print()",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": t}],
        }
        for i, t in enumerate(texts)
    ]
    return json.dumps({"cells": cells, "metadata": {"papermill": {"duration": 1.0}}}).encode()


def test_timing_columns_and_keys_are_the_only_changes_allowed_in_runs():
    faster = LOG.replace("7.745,0.52", "9.1,0.44")
    assert compare_bytes("results/runs/x/log.csv", LOG.encode(), faster.encode()) == (
        "same numbers",
        "only images_per_s, train_seconds changed",
    )
    verdict, detail = compare_bytes(
        "results/runs/x/log.csv", LOG.encode(), LOG.replace("14.4647", "14.4648").encode()
    )
    assert verdict == "differs" and detail == "1 cell(s), first: row 0 loss 14.4647 -> 14.4648"
    more = (
        LOG.replace("train_seconds\n", "train_seconds,loss_vfl_all\n")
        .replace("0.52\n", "0.52,0.2\n")
        .replace("3.97\n", "3.97,0.3\n")
    )  # retrained by code that logs one more term
    assert compare_bytes("log.csv", LOG.encode(), more.encode()) == (
        "same numbers",
        "new column(s) loss_vfl_all",
    )
    assert compare_bytes("log.csv", more.encode(), LOG.encode()) == ("differs", "column(s) loss_vfl_all gone")
    run_table = "row,seed,AP,code\nbaseline,0,0.4061,e8f0da67e13f\n"
    assert compare_bytes(
        "results/tables/t_runs.csv", run_table.encode(), run_table.replace("e8f0", "8ac5").encode()
    ) == ("same numbers", "only code changed")  # the retrained run's commit
    assert compare_bytes("t.csv", LOG.encode(), LOG.rsplit("\n", 2)[0].encode() + b"\n")[1] == "2 rows -> 1"
    old = json.dumps({"AP": 0.4353, "train_seconds": 197.07}).encode()
    assert (
        compare_bytes("m.json", old, json.dumps({"AP": 0.4353, "train_seconds": 171.5}).encode())[0]
        == "same numbers"
    )
    assert compare_bytes("m.json", old, json.dumps({"AP": 0.4352, "train_seconds": 197.07}).encode()) == (
        "differs",
        "1 key(s), first: AP 0.4353 -> 0.4352",
    )
    assert compare_bytes("m.json", old, json.dumps({"train_seconds": 197.07}).encode())[0] == "differs"


def test_run_configs_compare_by_their_hash_and_provenance_always_changes():
    cfg = get_profile("cpu")
    full = cfg.to_dict()
    older = json.loads(json.dumps(full))
    del older["model"]["pos_embed"]  # written before the option existed: its default keeps the run the same
    verdict, detail = compare_bytes(
        "results/runs/h/config.json", json.dumps(older).encode(), json.dumps(full).encode()
    )
    assert (verdict, detail) == ("same config", f"both hash to {config_hash(cfg)}")
    other = json.loads(json.dumps(full))
    other["loss"]["st"] = True
    assert (
        compare_bytes("results/runs/h/config.json", json.dumps(full).encode(), json.dumps(other).encode())[0]
        == "differs"
    )
    assert compare_bytes("results/runs/h/provenance.json", b"{}", b'{"git_sha": "b"}')[0] == "provenance"


def test_pngs_compare_by_pixels_and_notebooks_count_changed_cells():
    assert compare_bytes("f.png", _png(1.0, "a"), _png(1.0, "b")) == ("same pixels", "metadata only")
    verdict, detail = compare_bytes("f.png", _png(1.0), _png(0.5))
    assert verdict == "differs" and "of pixels" in detail
    assert compare_bytes(
        "n.ipynb", _notebook("AP 0.435\n", "12.0 s\n"), _notebook("AP 0.435\n", "9.5 s\n")
    ) == ("re-executed", "1 of 2 code cells print something else")
    assert compare_bytes("x.txt", b"a", b"b") == ("differs", "1 -> 1 bytes")
    assert compare_bytes("x.txt", b"a", b"a") == ("identical", "")
    assert compare_bytes("t.csv", b"a,b\n1,2\n", b'a,b\n1,"2\n')[0] == "differs"  # unreadable is not ok


@pytest.fixture()
def repo(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    files = {
        "results/tables/t.csv": LOG,
        "results/tables/t.md": "| loss |\n| 14.4647 |\n",
        "results/tables/u.csv": LOG,
        "results/tables/u.md": "u\n",
        "results/tables/gone.csv": "a\n1\n",
        "results/README.md": "notes\n",
        "code.py": "x = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / ".gitignore").write_text("*.pt\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    return tmp_path


def test_a_reproduction_that_only_moved_timings_passes(repo, capsys):
    (repo / "results/tables/t.csv").write_text(LOG.replace("0.52", "0.61"))
    (repo / "results/tables/t.md").write_text("| loss |\n| 14.4647 | 0.61 |\n")
    (repo / "results/new.json").write_text("{}")
    (repo / "results/staged.json").write_text("{}")
    subprocess.run(["git", "add", "results/staged.json"], cwd=repo, check=True)
    (repo / "results/weights.pt").write_bytes(b"ignored")
    (repo / "code.py").write_text("x = 2\n")  # outside results/: not compared
    (repo / "results/tables/gone.csv").unlink()
    table = compare(repo / "results")
    assert dict(zip(table["path"], table["verdict"])) == {
        "results/new.json": "new",
        "results/staged.json": "new",
        "results/tables/gone.csv": "deleted",
        "results/tables/t.csv": "same numbers",
        "results/tables/t.md": "as its .csv",
    }
    assert cli.main(["compare", "--results", str(repo / "results")]) == 1  # a deleted table fails
    (repo / "results/tables/gone.csv").write_text("a\n1\n")  # restored: nothing fails
    assert cli.main(["compare", "--results", str(repo / "results")]) == 0
    out = capsys.readouterr().out
    assert "1 same numbers" in out and "1 as its .csv" in out and "2 new" in out


def test_a_changed_number_fails_and_its_markdown_does_not_hide_it(repo, capsys):
    (repo / "results/tables/u.csv").write_text(LOG.replace("13.5222", "13.6"))
    (repo / "results/tables/u.md").write_text("u2\n")
    table = compare(repo / "results")
    assert dict(zip(table["path"], table["verdict"])) == {
        "results/tables/u.csv": "differs",
        "results/tables/u.md": "differs",
    }
    assert cli.main(["compare", "--results", str(repo / "results")]) == 1
    assert "row 1 loss 13.5222 -> 13.6" in capsys.readouterr().out


def test_an_unchanged_tree_and_bad_folders(repo, tmp_path_factory, capsys):
    assert compare(repo / "results").empty
    assert cli.main(["compare", "--results", str(repo / "results")]) == 0
    assert "no file under results/ changed" in capsys.readouterr().out
    assert cli.main(["compare", "--results", str(repo / "nowhere")]) == 2
    assert "nowhere: no such results folder" in capsys.readouterr().err
    outside = tmp_path_factory.mktemp("plain")
    assert cli.main(["compare", "--results", str(outside)]) == 2
    assert "git rev-parse --show-toplevel failed" in capsys.readouterr().err
    assert cli.main(["compare", "--results", str(repo / "results"), "--rev", "nosuchrev"]) == 2


def _run_files(ap: float, loss: str, kind: str | None, seed: int = 0) -> dict[str, str]:
    cfg = get_profile("smoke").to_dict()
    cfg["train"]["seed"] = seed
    prov = {"git_sha": "a" * 40, **({"machine_kind": kind} if kind else {})}
    return {
        "config.json": json.dumps(cfg),
        "metrics.json": json.dumps({"AP": ap, "train_seconds": 9.0}),
        "log.csv": LOG.replace("13.5222", loss),
        "provenance.json": json.dumps(prov),
    }


def _commit_runs(repo, runs: dict[str, dict[str, str]]):
    for run, files in runs.items():
        for name, text in files.items():
            (repo / "results/runs" / run).mkdir(parents=True, exist_ok=True)
            (repo / "results/runs" / run / name).write_text(text)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "runs"], cwd=repo, check=True
    )


@pytest.mark.parametrize("committed_kind", ["AuthenticAMD x86_64 AVX2 avx2 fma", None])
def test_a_run_retrained_on_another_kind_of_machine_is_named_with_its_size(repo, committed_kind, capsys):
    _commit_runs(
        repo,
        {
            "r0": _run_files(0.40, "13.5222", committed_kind),
            "r1": _run_files(0.42, "13.6", committed_kind, seed=1),
            "r2": _run_files(0.44, "13.4", committed_kind, seed=2),
        },
    )
    for name, text in _run_files(0.41, "13.5301", "GenuineIntel x86_64 AVX512 avx2 fma avx512f").items():
        (repo / "results/runs/r0" / name).write_text(text)
    table = dict(
        zip(
            compare(repo / "results")["path"],
            zip(*[compare(repo / "results")[c] for c in ("verdict", "detail")]),
        )
    )
    expected = "machine" if committed_kind else "differs"
    assert (
        table["results/runs/r0/metrics.json"][0] == expected
        and table["results/runs/r0/log.csv"][0] == expected
    )
    detail = table["results/runs/r0/metrics.json"][1]
    committed = "AuthenticAMD x86_64 AVX2" if committed_kind else "a kind not recorded"
    assert detail.startswith(
        f"retrained on GenuineIntel x86_64 AVX512, committed on {committed}: "
        f"AP 0.4000 -> 0.4100 (+0.0100; seed std of this config 0.0153 over 3)"
    )  # 0.41, 0.42, 0.44
    assert table["results/runs/r0/provenance.json"][0] == "provenance"
    assert cli.main(["compare", "--results", str(repo / "results")]) == (0 if committed_kind else 1)
    out = capsys.readouterr().out
    assert f"2 {expected}" in out and "1 run(s) retrained on another kind of machine" in out


def test_a_revision_never_reaches_git_as_an_option(repo, capsys):
    victim = repo / "results/README.md"
    before = victim.read_bytes()
    for rev in (f"--output={victim}", "-p", ""):
        assert cli.main(["compare", "--results", str(repo / "results"), f"--rev={rev}"]) == 2
        assert "not a revision" in capsys.readouterr().err
    assert victim.read_bytes() == before
    assert cli.main(["compare", "--results", str(repo / "results"), "--rev", "HEAD~5"]) == 2
    assert "--rev 'HEAD~5': no such commit" in capsys.readouterr().err
