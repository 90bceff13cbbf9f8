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
