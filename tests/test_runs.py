import json
import os

import pytest

from sodlib.config import get_profile, override
from sodlib.io import atomic_write_json
from sodlib.training import runs


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}  # old content intact
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temp file left


def test_config_hash_stable_and_sensitive():
    a, b = get_profile("cpu"), get_profile("cpu")
    assert runs.config_hash(a) == runs.config_hash(b)
    assert runs.config_hash(a) != runs.config_hash(override(a, "loss.st=true"))
    assert len(runs.config_hash(a)) == 12


def test_save_and_load_run(tmp_path):
    cfg = get_profile("smoke")
    assert runs.load_finished_run(cfg, tmp_path) is None
    d = runs.save_run(cfg, {"AP": 0.5}, tmp_path, seed=3, wall_seconds=1.23456)
    assert d == tmp_path / "runs" / runs.config_hash(cfg)
    assert runs.load_finished_run(cfg, tmp_path) == {"AP": 0.5}
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["seed"] == 3 and prov["wall_seconds"] == 1.235
    assert prov["packages"]["torch"].startswith("2.")
    stored = json.loads((d / "config.json").read_text())
    assert type(cfg).from_dict(stored) == cfg  # the stored config rebuilds the run exactly


def test_config_hash_ignores_new_fields_at_their_defaults():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Old:
        lr: float = 1e-3
        st: bool = False

    @dataclasses.dataclass(frozen=True)
    class New:  # a later version adds an option whose default keeps the old behaviour
        lr: float = 1e-3
        st: bool = False
        weight_new: float = 1.0

    assert runs.config_hash(Old(lr=2e-3)) == runs.config_hash(New(lr=2e-3))
    assert runs.config_hash(New(lr=2e-3)) != runs.config_hash(New(lr=2e-3, weight_new=0.5))


def test_rehash_runs_moves_folders_whose_hash_changed(tmp_path):
    cfg = get_profile("smoke")
    d = runs.save_run(cfg, {"AP": 0.1}, tmp_path)
    stale = d.parent / "000000000000"
    os.replace(d, stale)  # as if the hash rule or a default had changed since
    assert runs.rehash_runs(tmp_path) == {"000000000000": runs.config_hash(cfg)}
    assert runs.load_finished_run(cfg, tmp_path) == {"AP": 0.1}
    assert runs.rehash_runs(tmp_path) == {}


def test_options_that_cannot_act_do_not_change_a_runs_identity():
    base = get_profile("smoke")
    inert = override(base, "loss.sr_grad=end_to_end", "loss.weight_sr_gen=2.0")  # SR is off
    assert inert.canonical() == base and runs.config_hash(inert) == runs.config_hash(base)
    sr = override(base, "loss.sr=true")
    active = override(sr, "loss.sr_grad=end_to_end")
    assert active.canonical() == active and runs.config_hash(active) != runs.config_hash(sr)


def _stored_run(root, name, cfg, ap):
    runs.write_run(root / "runs" / name, cfg, {"AP": ap})


def test_rehash_moves_a_chain_in_an_order_that_frees_each_target(tmp_path):
    """A default flips from end_to_end to difficulty: the old default's run sits in the name the new default
    takes, and the run that asked for difficulty explicitly sits under an old name."""
    sr = override(get_profile("smoke"), "loss.sr=true")  # difficulty, the default
    old_default = override(sr, "loss.sr_grad=end_to_end")
    _stored_run(tmp_path, runs.config_hash(sr), old_default, 0.1)
    _stored_run(tmp_path, "0123456789ab", sr, 0.2)
    moved = runs.rehash_runs(tmp_path)
    assert moved == {
        runs.config_hash(sr): runs.config_hash(old_default),
        "0123456789ab": runs.config_hash(sr),
    }
    assert list(moved) == [runs.config_hash(sr), "0123456789ab"]  # the target was vacated first
    assert runs.load_finished_run(sr, tmp_path) == {"AP": 0.2}
    assert runs.load_finished_run(old_default, tmp_path) == {"AP": 0.1}
    assert runs.rehash_runs(tmp_path) == {}


def test_rehash_refuses_a_held_target_before_moving_anything(tmp_path):
    cfg = get_profile("smoke")
    runs.save_run(cfg, {"AP": 0.3}, tmp_path)  # holds cfg's name and stays
    _stored_run(tmp_path, "0123456789ab", cfg, 0.4)  # wants the same name
    with pytest.raises(FileExistsError, match="0123456789ab"):
        runs.rehash_runs(tmp_path)
    assert (tmp_path / "runs" / "0123456789ab").is_dir() and runs.load_finished_run(cfg, tmp_path) == {
        "AP": 0.3
    }


def test_every_committed_run_sits_under_its_configs_name():
    """A default that changes under committed runs orphans them (the old default's runs answer for the new
    one): `python -m sodlib.training.runs --rehash` moves them, and this test fails until it has."""
    from sodlib.config import RunConfig
    from sodlib.io import SOURCE_ROOT

    misplaced = {}
    for cfg_path in sorted((SOURCE_ROOT / "results" / "runs").glob("*/config.json")):
        name = runs.config_hash(RunConfig.from_dict(json.loads(cfg_path.read_text())))
        if name != cfg_path.parent.name:
            misplaced[cfg_path.parent.name] = name
    assert not misplaced, f"run folders named after another config (folder: config's name): {misplaced}"


def test_rehash_command_reports_moves_and_refusals(tmp_path, capsys):
    cfg = get_profile("smoke")
    _stored_run(tmp_path, "0123456789ab", cfg, 0.4)
    assert runs.main(["--rehash", "--results", str(tmp_path)]) == 0
    assert f"0123456789ab -> {runs.config_hash(cfg)}" in capsys.readouterr().out
    _stored_run(tmp_path, "ba9876543210", cfg, 0.5)  # the name it wants is taken
    assert runs.main(["--rehash", "--results", str(tmp_path)]) == 1
    assert "ba9876543210" in capsys.readouterr().out


def test_git_sha_is_dirty_for_code_changes_not_for_results(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "log.csv").write_text("1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = runs.git_sha(tmp_path)
    assert len(clean) == 40
    (tmp_path / "results" / "log.csv").write_text("2\n")  # another run writing its log
    assert runs.git_sha(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert runs.git_sha(tmp_path) == clean + "-dirty"


def test_provenance_names_the_code_loaded_and_where_the_tree_ended(monkeypatch):
    shas = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(runs, "_CODE_SHA", None)
    monkeypatch.setattr(runs, "git_sha", lambda repo=None: next(shas))
    assert runs.code_sha() == "a" * 40  # the first ask: what this process loaded
    info = runs.provenance(seed=1)  # a commit landed while it trained
    assert info["git_sha"] == "a" * 40 and info["git_sha_at_end"] == "b" * 40
    monkeypatch.setattr(runs, "git_sha", lambda repo=None: "a" * 40)
    assert "git_sha_at_end" not in runs.provenance()


def test_provenance_names_the_cpu_and_the_kind_of_machine(monkeypatch):
    from sodlib import hardware

    monkeypatch.setattr(runs, "machine_kind", lambda: "AuthenticAMD x86_64 AVX2 avx2 fma")
    info = runs.provenance()
    assert info["machine_kind"] == "AuthenticAMD x86_64 AVX2 avx2 fma"
    assert info["cpu"] == hardware.cpu_features() and info["cpu"].startswith(f"{os.cpu_count()} cores")
