import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sodlib.checkpoints import load_checkpoint
from sodlib.config import get_profile, override
from sodlib.training.engine import NonFiniteLossError, epoch_batches, train


def _smoke(*extra):
    return override(
        get_profile("smoke"), "train.max_iters=6", "train.checkpoint_every=2", "train.log_every=1", *extra
    )


def test_epoch_batches_deterministic_and_disjoint_across_ranks():
    a = epoch_batches(20, 3, seed=1, epoch=0)
    assert a == epoch_batches(20, 3, seed=1, epoch=0)
    assert a != epoch_batches(20, 3, seed=1, epoch=1)
    r0 = epoch_batches(20, 2, seed=1, epoch=0, rank=0, world=2)
    r1 = epoch_batches(20, 2, seed=1, epoch=0, rank=1, world=2)
    flat0, flat1 = [i for b in r0 for i in b], [i for b in r1 for i in b]
    assert not set(flat0) & set(flat1) and len(flat0) == len(flat1) == 10


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    cfg = _smoke()
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_after=3)
    assert part["interrupted"] and part["iterations"] == 3
    resumed = train(cfg, tmp_path / "part", progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    strip = ("train_seconds",)
    assert {k: v for k, v in full.items() if k not in strip} == {
        k: v for k, v in resumed.items() if k not in strip
    }
    with open(tmp_path / "part" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from sodlib.losses.criterion import SetCriterion

    calls = {"n": 0}
    original = SetCriterion.weighted_total

    def poisoned(self, loss_dict):
        calls["n"] += 1
        total = original(self, loss_dict)
        return total * float("nan") if calls["n"] == 3 else total

    monkeypatch.setattr(SetCriterion, "weighted_total", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 2"):
        train(_smoke(), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


@pytest.mark.slow
def test_smoke_training_reduces_the_loss(tmp_path):
    cfg = override(
        get_profile("smoke"),
        "train.max_iters=60",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.epochs=100",
    )
    train(cfg, tmp_path, progress=False)
    with open(tmp_path / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 60
    # measured 0.84 / 0.83 for seeds 0 / 1; an untrained or frozen model stays near 1.0
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sodlib",
        "train",
        "--profile",
        "smoke",
        "--set",
        "train.max_iters=2",
        "--set",
        "train.checkpoint_every=2",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and len(state["rng"]) == 2
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    cfg = override(get_profile("smoke"), "train.max_iters=2", "train.checkpoint_every=2")
    first = train(cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "last.pt").unlink()  # a fresh clone has metrics but no checkpoint
    from sodlib.training import engine

    monkeypatch.setattr(
        engine, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError("retrained"))
    )
    assert train(cfg, tmp_path, progress=False) == json.loads((tmp_path / "metrics.json").read_text())
    assert first["iterations"] == 2
    with pytest.raises(ValueError, match="different config"):
        train(override(cfg, "train.lr=0.5"), tmp_path, progress=False)
    # an option that cannot act (SR's generator mode with SR off) is the same run
    assert train(override(cfg, "loss.sr_grad=end_to_end"), tmp_path, progress=False)["iterations"] == 2
    with pytest.raises(ValueError, match="different config"):
        train(override(cfg, "loss.sr=true", "loss.sr_grad=end_to_end"), tmp_path, progress=False)
    monkeypatch.undo()
    with open(tmp_path / "log.csv") as f:
        header = next(csv.reader(f))
    assert "loss_vfl_all" in header
    old = [c for c in header if not c.endswith("_all")]  # a committed log without the _all columns
    (tmp_path / "log.csv").write_text(",".join(old) + "\n" + ",".join(["1"] * len(old)) + "\n")
    (tmp_path / "eval.csv").write_text("iteration,train_seconds,AP\n2,1.0,0.5\n")
    train(cfg, tmp_path, progress=False, need_checkpoint=True)  # weights wanted: retrains
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.reader(f))
    # this code's columns, this run's rows
    assert rows[0] == header and [r[0] for r in rows[1:]] == ["1", "2"]
    evals = (tmp_path / "eval.csv").read_text() if (tmp_path / "eval.csv").exists() else ""
    assert "2,1.0,0.5" not in evals  # the earlier run's evaluation went with its log


def test_tensorboard_events_follow_the_csv_logs(tmp_path):
    """Training writes TensorBoard events beside log.csv: the logged losses, learning rate and throughput, the
    evaluation metrics, and the attention figure at the evaluation; an interrupted and resumed run keeps one
    value per iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = override(
        _smoke(), "train.max_iters=4", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2"
    )
    train(cfg, tmp_path, progress=False, stop_after=3)  # interrupted after iteration 3, checkpoint at 2
    train(cfg, tmp_path, progress=False)
    events = EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    ).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "val/AP", "val/AP50"} <= set(tags["scalars"])
    assert "attention/val_image_0" in tags["images"]
    with open(tmp_path / "log.csv") as f:
        csv_loss = {int(r["iteration"]): float(r["loss"]) for r in csv.DictReader(f)}
    board_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(board_loss) == sorted(csv_loss) == [1, 2, 3, 4]
    for step, value in csv_loss.items():
        assert board_loss[step] == pytest.approx(value, rel=1e-5)
    assert [e.step for e in events.Scalars("val/AP")] == [2, 4]
    assert not override(cfg, "train.tensorboard=false").train.tensorboard


def test_resume_refuses_another_config_naming_the_keys(tmp_path):
    from sodlib.cli import main
    from sodlib.training.engine import config_differences

    assert config_differences(
        {"train": {"lr": 1e-3, "threads": 1, "multiscale": [256]}},
        {"train": {"lr": 2e-3, "threads": 2, "multiscale": (256,)}},
    ) == ["train.lr: 0.001 → 0.002"]
    cfg = _smoke()
    part = train(cfg, tmp_path / "run", progress=False, stop_after=2)
    assert part["interrupted"]
    changed = override(cfg, "train.lr=0.002", "loss.st=true")
    with pytest.raises(
        ValueError,
        match=r"interrupted run of another config \(loss\.st: False → True; "
        r"train\.lr: 0\.001 → 0\.002\)",
    ):
        train(changed, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 2  # untouched
    # the CLI: one line, exit 2; the same settings (threads aside) resume
    assert (
        main(["train", "--profile", "smoke", "--set", "train.lr=0.002", "--out", str(tmp_path / "run")]) == 2
    )
    resumed = train(override(cfg, "train.threads=1", "train.log_every=3"), tmp_path / "run", progress=False)
    assert resumed["iterations"] == cfg.train.max_iters


def test_logged_lr_is_the_main_groups_not_the_backbones():
    from sodlib.build import build_detector
    from sodlib.training.optim import build_optimizer, set_lr

    cfg = override(_smoke(), "train.lr=0.001", "train.lr_backbone_mult=0.1")
    optimizer = build_optimizer(build_detector(cfg.model), cfg.train)
    assert optimizer.param_groups[0]["name"].startswith("backbone")
    assert set_lr(optimizer, 0.5) == pytest.approx(0.0005)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == pytest.approx(0.00005)


def test_max_iters_beyond_the_epochs_is_announced(tmp_path, caplog):
    cfg = override(_smoke(), "train.epochs=1", "train.max_iters=50")  # 16 images / batch 2: 8 per epoch
    with caplog.at_level("WARNING", logger="sodlib.training.engine"):
        metrics = train(cfg, tmp_path, progress=False)
    assert metrics["iterations"] == 8
    assert "train.max_iters=50 is more than train.epochs=1 allow" in caplog.text


def _no_dataset(monkeypatch):
    from sodlib.training import engine

    monkeypatch.setattr(
        engine, "build_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built"))
    )


def test_amp_where_autocast_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch):
    _no_dataset(monkeypatch)
    with pytest.raises(ValueError, match=r"train\.amp=true: .* device 'meta'"):
        train(_smoke("train.amp=true", "train.device=meta"), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_emulated_bf16_is_announced_once_before_the_dataset(tmp_path, monkeypatch, caplog):
    from sodlib import hardware

    _no_dataset(monkeypatch)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    hardware._warn_emulated_bf16.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="sodlib.hardware"):
            for run in ("a", "b"):
                with pytest.raises(AssertionError, match="built"):
                    train(_smoke("train.amp=true"), tmp_path / run, progress=False)
    finally:
        hardware._warn_emulated_bf16.cache_clear()
    assert (
        len(caplog.records) == 1 and "bf16 autocast is emulated on this CPU" in caplog.records[0].getMessage()
    )


def test_exploding_weights_never_replace_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss stays finite but a BatchNorm statistic turns inf after iteration 3 (train-mode batch norms do
    not read it, so nothing else fails): the run stops at the next checkpoint naming the iteration and the
    tensor, and the checkpoint of iteration 2 is kept."""
    import sodlib.training.engine

    cfg = override(_smoke(), "train.checkpoint_every=2")
    built = []
    original_build, original_step = sodlib.build_detector, torch.optim.AdamW.step

    def build(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        if self.state and min(s["step"] for s in self.state.values()) == 3:
            norm = next(m for m in built[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
            norm.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(sodlib.training.engine, "build_detector", build)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite weights at iteration 4 \(.*running_var\); the last "
        r"checkpoint with finite weights is .*last.pt",
    ):
        train(cfg, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


def test_a_run_folder_trains_in_one_process_at_a_time(tmp_path):
    from sodlib.io import LockedError, file_lock
    from sodlib.training.engine import LOCK_FILE, train

    cfg = get_profile("smoke")
    held = file_lock(tmp_path / LOCK_FILE)  # another process training there
    with held, pytest.raises(LockedError, match=rf"run folder {tmp_path} is in use by process \d+"):
        train(cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing else written


def test_a_train_split_without_annotations_or_with_other_classes_is_refused_before_training(tmp_path):
    from sodlib.data.datasets import CocoDetection
    from sodlib.training.engine import check_train_split

    cfg = get_profile("smoke")
    n = cfg.model.num_classes
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0}
        ],
        "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(n)],
    }
    check_train_split(CocoDetection(tmp_path, coco), cfg)  # fine
    empty = {**coco, "annotations": []}
    with pytest.raises(ValueError, match="no annotation to learn from"):
        check_train_split(CocoDetection(tmp_path, empty), cfg)
    fewer = {**coco, "categories": coco["categories"][:3]}
    with pytest.raises(
        ValueError, match=rf"3 categories, but model.num_classes={n}; set --set model.num_classes=3"
    ):
        check_train_split(CocoDetection(tmp_path, fewer), cfg)
