"""Training loop: one CPU or many GPUs (torch.distributed DDP), exact resume, atomic checkpoints.

``train(cfg)`` builds data, detector and criterion from a :class:`~sodlib.config.RunConfig`, trains
with AdamW + warmup + EMA + gradient clipping, writes ``checkpoints/last.pt`` every
``train.checkpoint_every`` iterations (atomically, config embedded), a CSV log of losses, learning
rate and throughput, and finally evaluates the EMA model (the raw weights when ``train.ema_decay`` is 0)
on the validation split.

Exact resume: batches come from a per-epoch permutation drawn from ``(seed, epoch)``; a checkpoint
stores the iteration, the position inside the epoch and the RNG states, so an interrupted run that
resumes produces the same weights as an uninterrupted one (on CPU with ``data.num_workers=0``; with
worker processes the augmentation streams differ after a resume).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from sodlib.build import build_criterion, build_detector
from sodlib.checkpoints import load_checkpoint, save_checkpoint
from sodlib.config import RunConfig
from sodlib.data.datasets import build_dataset, collate_fn
from sodlib.data.datastats import min_instance_size_px
from sodlib.hardware import check_amp
from sodlib.inference.heatmaps import figure_rows, object_attention, plot_object_attention
from sodlib.inference.predict import evaluate_model
from sodlib.io import atomic_write_json, atomic_write_text, file_lock
from sodlib.losses.criterion import base_loss_name
from sodlib.official import init_from
from sodlib.training.mechanisms import measure
from sodlib.training.optim import ModelEMA, build_optimizer, lr_factor, set_lr
from sodlib.training.runs import code_sha, read_metrics, write_run

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN or inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------- distributed helpers


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local if device == "cuda" else int(device.split(":")[1]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    return rank, world, dev


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool, device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- data order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The batches of one epoch: a permutation drawn from (seed, epoch), split across ranks, drop_last."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()[rank::world]
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def _to_float32(x):
    """Floating tensors in nested dicts/lists → float32 (autocast outputs are bf16)."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    return x


def _to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


# ---------------------------------------------------------------- the loop

LOCK_FILE = ".train.lock"  # in the run folder while a process trains there (git ignores it)


def check_train_split(dataset, cfg: RunConfig) -> None:
    """Refuse, before any training, a train split the run cannot learn from or evaluate: no annotation at
    all, or a category count other than ``model.num_classes`` (labels beyond it cannot be trained, classes
    beyond the data's cannot be named at evaluation)."""
    where = getattr(dataset, "ann_file", None) or f"the {cfg.data.train_split} split"
    n = len(dataset.category_ids)
    if n != cfg.model.num_classes:
        raise ValueError(
            f"{where}: {n} categories, but model.num_classes={cfg.model.num_classes}; set "
            f"--set model.num_classes={n} --set data.num_classes={n}"
        )
    if not any(not a.get("iscrowd", 0) and not a.get("ignore", 0) for a in dataset.coco["annotations"]):
        raise ValueError(f"{where}: no annotation to learn from (every image is empty or every box ignored)")


def train(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    data_root: str | None = None,
    resume: bool = True,
    progress: bool = True,
    protocol: str = "coco",
    stop_after: int | None = None,
    need_checkpoint: bool = False,
) -> dict:
    """Train ``cfg`` into ``out_dir`` and return the final validation metrics (plus timing).

    A finished run (``metrics.json`` present) is not trained again: its stored metrics are returned,
    also in a fresh clone where only the committed metrics exist; ``need_checkpoint=True`` retrains
    when the (uncommitted) checkpoint is missing, for callers that need the weights.
    ``stop_after`` interrupts the run after that many iterations (tests use it to check resume).
    A run folder trains in one process at a time: a second process is refused (``LockedError``) naming the
    holder.
    """
    # before any work: bf16 autocast where it cannot run, or where it runs emulated
    check_amp(cfg.train.amp, cfg.train.device)
    # rank 0 holds the run folder's lock for all ranks of a distributed run (torchrun sets RANK)
    lock = (
        file_lock(Path(out_dir) / LOCK_FILE, wait=False, what=f"run folder {out_dir}")
        if int(os.environ.get("RANK", "0")) == 0
        else contextlib.nullcontext()
    )
    with lock:
        return _train(cfg, out_dir, data_root, resume, progress, protocol, stop_after, need_checkpoint)


def _train(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    data_root: str | None,
    resume: bool,
    progress: bool,
    protocol: str,
    stop_after: int | None,
    need_checkpoint: bool,
) -> dict:
    """:func:`train` while this process holds the run folder's lock."""
    out_dir = Path(out_dir)
    stored_metrics = _finished_metrics(cfg, out_dir, resume, need_checkpoint)
    if stored_metrics is not None:
        return stored_metrics

    code_sha()  # provenance names the code this process loaded, not the commit the tree reached at the end
    run = _setup(cfg, out_dir, data_root, resume, protocol)
    if resume and run.ckpt_path.exists():
        _resume(run)
    if run.main_process:
        _truncate_log(run.log_path, run.it)
        _truncate_log(out_dir / "eval.csv", run.it)

    board = _train_loop(run, progress, stop_after)
    if stop_after is not None and run.it < run.total_iters and not run.budget_spent():
        board.close()
        return {"iterations": run.it, "train_seconds": run.train_seconds, "interrupted": True}

    metrics = _finish(run, board)
    board.close()
    _barrier()
    return metrics


@dataclass
class _Run:
    """What one training process holds: the parts :func:`_setup` builds and the position that
    :func:`_train_loop` advances and a checkpoint stores."""

    cfg: RunConfig
    out_dir: Path
    data_root: str | None
    protocol: str
    rank: int
    world: int
    device: torch.device
    train_ds: object
    model: nn.Module
    criterion: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    total_iters: int
    it: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    _val_ds: object = field(default=None, repr=False)

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated: the EMA weights, or the raw ones without EMA."""
        return self.ema.module if self.ema is not None else self.model

    def val_ds(self):
        """The validation split, built on first use."""
        if self._val_ds is None:
            data = self.cfg.data
            self._val_ds = build_dataset(data, data.val_split, train=False, data_root=self.data_root)
        return self._val_ds

    def budget_spent(self) -> bool:
        """Whether ``train.time_budget_s`` (when set) is used up."""
        budget = self.cfg.train.time_budget_s
        return bool(budget and self.train_seconds >= budget)


# ---------------------------------------------------------------- set-up and resume


def _finished_metrics(cfg: RunConfig, out_dir: Path, resume: bool, need_checkpoint: bool) -> dict | None:
    """The stored metrics of a finished run of ``cfg`` in ``out_dir``, or None when it must (re)train.
    A finished run of another config is refused."""
    stored_metrics = read_metrics(out_dir) if resume else None  # a corrupt metrics.json is moved aside
    if stored_metrics is None:
        return None
    stored = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else None
    if stored is not None and RunConfig.from_dict(stored).canonical() != cfg.canonical():
        raise ValueError(f"{out_dir} holds a run of a different config; choose another folder")
    if not need_checkpoint or (out_dir / "checkpoints" / "last.pt").exists():
        log.info("%s already finished; returning its stored metrics", out_dir)
        return stored_metrics
    return None


def _setup(cfg: RunConfig, out_dir: Path, data_root: str | None, resume: bool, protocol: str) -> _Run:
    """Process group, seeds, training split, detector, criterion, optimizer and EMA of a run at iteration
    0."""
    tc = cfg.train
    rank, world, device = init_distributed(tc.device)
    main_process = rank == 0
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed + rank)
    random.seed(tc.seed + rank)

    if main_process:  # rank 0 generates SynthSOD on demand; the others wait for it
        train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True, data_root=data_root)
    _barrier()
    if not main_process:
        train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True, data_root=data_root)
    check_train_split(train_ds, cfg)

    model = build_detector(cfg.model)
    if tc.init_from and not (resume and (out_dir / "checkpoints" / "last.pt").exists()):
        report = init_from(model, tc.init_from)
        if main_process:
            print(report, flush=True)
    model = model.to(device)
    if cfg.model.iah and cfg.model.iah_as_px == 0:  # MRQM's A_s: sqrt of the smallest training gt area (px)
        model.aux_head.set_min_instance_size(min_instance_size_px(train_ds, cfg.data.image_size))
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    ddp_model = (
        nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    )
    optimizer = build_optimizer(model, tc, extra=criterion)
    ema = ModelEMA(model, tc.ema_decay, tc.ema_warmups) if tc.ema_decay > 0 else None
    return _Run(
        cfg=cfg,
        out_dir=out_dir,
        data_root=data_root,
        protocol=protocol,
        rank=rank,
        world=world,
        device=device,
        train_ds=train_ds,
        model=model,
        criterion=criterion,
        ddp_model=ddp_model,
        optimizer=optimizer,
        ema=ema,
        total_iters=_total_iters(tc, len(train_ds), rank, world),
    )


def _total_iters(tc, n_images: int, rank: int, world: int) -> int:
    """``train.epochs`` worth of batches, capped by ``train.max_iters``."""
    batches_per_epoch = len(epoch_batches(n_images, tc.batch_size, tc.seed, 0, rank, world))
    if batches_per_epoch == 0:
        raise ValueError(f"train split has {n_images} images, fewer than train.batch_size={tc.batch_size}")
    total_iters = tc.epochs * batches_per_epoch
    if tc.max_iters:
        if tc.max_iters > total_iters and rank == 0:
            log.warning(
                "train.max_iters=%d is more than train.epochs=%d allow (%d batches per epoch): training "
                "stops at %d iterations; raise train.epochs to train longer",
                tc.max_iters,
                tc.epochs,
                batches_per_epoch,
                total_iters,
            )
        total_iters = min(total_iters, tc.max_iters)
    return total_iters


def _resume(run: _Run) -> None:
    """Load weights, optimizer, EMA, position and RNG states from the run's checkpoint."""
    state = load_checkpoint(run.ckpt_path, map_location=run.device)
    # through RunConfig, so that fields added since the checkpoint was written take their defaults
    changed = config_differences(RunConfig.from_dict(state.get("config") or {}).to_dict(), run.cfg.to_dict())
    if changed:
        raise ValueError(
            f"{run.ckpt_path} holds an interrupted run of another config ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}); resume it with the same settings, or start "
            f"over with --no-resume or another --out"
        )
    run.model.load_state_dict(state["model"])
    run.criterion.load_state_dict(state["criterion"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.it, run.epoch, run.batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
    run.train_seconds = float(state["train_seconds"])
    _set_rng_state(state["rng"][run.rank] if isinstance(state["rng"], list) else state["rng"])
    log.info("resumed from %s at iteration %d", run.ckpt_path, run.it)


# ---------------------------------------------------------------- steps, checkpoints, evaluation


def _train_loop(run: _Run, progress: bool, stop_after: int | None) -> _Board:
    """Train from the run's position to its end, to ``stop_after`` or to ``train.time_budget_s``, logging,
    evaluating and checkpointing on the way; returns the open TensorBoard writer."""
    tc = run.cfg.train
    show = None if (progress and run.main_process) else True  # None: tqdm turns itself off when not on a TTY
    bar = tqdm(
        total=run.total_iters, initial=run.it, desc=f"train {run.cfg.name}", disable=show, dynamic_ncols=True
    )
    writer = _LogWriter(run.log_path) if run.main_process else None
    board = _Board(run.out_dir, run.it, run.main_process and tc.tensorboard)
    clip_params = [*run.model.parameters(), *run.criterion.parameters()]  # built once, not every step
    run.ddp_model.train()
    run.criterion.train()
    stop = run.it >= run.total_iters
    while not stop and run.epoch < tc.epochs:
        t_last = time.perf_counter()
        for images, targets in _epoch_loader(run):
            loss, loss_dict, lr = _step(run, images, targets, clip_params)
            run.it += 1
            run.batch_in_epoch += 1
            now = time.perf_counter()
            step_s, t_last = now - t_last, now
            run.train_seconds += step_s
            if writer is not None and (run.it % tc.log_every == 0 or run.it == 1):
                images_per_s = tc.batch_size * run.world / step_s
                weighted = run.criterion.weighted(loss_dict)
                row = writer.write(run.it, run.epoch, lr, loss, weighted, images_per_s, run.train_seconds)
                board.scalars(run.it, row, "train")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            stop = (
                run.budget_spent()
                or run.it >= run.total_iters
                or (stop_after is not None and run.it >= stop_after)
            )
            if run.main_process and tc.eval_every and run.it % tc.eval_every == 0 and not stop:
                _log_eval(run, run.eval_model, board)  # evaluation gives the model back in training mode
            if stop or run.it % tc.checkpoint_every == 0:
                _checkpoint(run)
            t_last = time.perf_counter()  # checkpoint and evaluation time is not training time
            if stop:
                break
        else:
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    bar.close()
    if writer is not None:
        writer.close()
    return board


def _epoch_loader(run: _Run) -> torch.utils.data.DataLoader:
    """The rest of the current epoch's batches, from the run's position in it."""
    tc = run.cfg.train
    batches = epoch_batches(len(run.train_ds), tc.batch_size, tc.seed, run.epoch, run.rank, run.world)
    # the loader's own generator keeps worker seeding off the global RNG (exact resume)
    return torch.utils.data.DataLoader(
        run.train_ds,
        batch_sampler=batches[run.batch_in_epoch :],
        collate_fn=collate_fn,
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(tc.seed * 100_003 + run.epoch),
    )


def _step(run: _Run, images, targets, clip_params: list) -> tuple[torch.Tensor, dict, float]:
    """One optimisation step on one batch: the weighted total loss, the loss terms and the learning rate."""
    tc = run.cfg.train
    images, targets = _to_device(images, targets, run.device)
    if tc.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if tc.multiscale:
        size = tc.multiscale[int(torch.randint(len(tc.multiscale), (1,)))]
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    lr = set_lr(run.optimizer, lr_factor(run.it, tc, run.total_iters))
    criterion = run.criterion
    # bf16 autocast on CUDA and on CPUs with bf16 units; the loss is computed in float32
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=tc.amp):
        outputs = run.ddp_model(
            images,
            targets,
            return_sampling=criterion.needs_sampling,
            return_hidden=criterion.needs_hidden,
        )
    loss_dict = criterion(_to_float32(outputs), targets)
    loss = criterion.weighted_total(loss_dict)
    if _any_rank(not bool(torch.isfinite(loss)), run.device):
        bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
        raise NonFiniteLossError(
            f"non-finite loss at iteration {run.it} (terms: {', '.join(bad) or 'total'}); "
            f"the last good checkpoint is {run.ckpt_path if run.ckpt_path.exists() else 'none yet'}"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.clip_max_norm > 0:
        nn.utils.clip_grad_norm_(clip_params, tc.clip_max_norm)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return loss, loss_dict, lr


def _checkpoint(run: _Run) -> None:
    """Write ``checkpoints/last.pt`` (rank 0, with every rank's RNG states); refuse non-finite weights."""
    # a finite loss can still leave exploding weights: never replace the last good checkpoint with those
    bad = next(
        (
            name
            for name, p in run.model.state_dict().items()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())
        ),
        None,
    )
    ckpt_path = run.ckpt_path
    if _any_rank(bad is not None, run.device):
        raise NonFiniteLossError(
            f"non-finite weights at iteration {run.it} ({bad or 'on another rank'}); the last checkpoint "
            f"with finite weights is {ckpt_path if ckpt_path.exists() else 'none yet'}"
        )
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if run.main_process:
        save_checkpoint(
            ckpt_path,
            model=run.model.state_dict(),
            criterion=run.criterion.state_dict(),
            optimizer=run.optimizer.state_dict(),
            ema=run.ema.state_dict() if run.ema else None,
            iteration=run.it,
            epoch=run.epoch,
            batch_in_epoch=run.batch_in_epoch,
            train_seconds=run.train_seconds,
            rng=rngs,
            config=run.cfg.to_dict(),
            categories=[
                {"id": int(c["id"]), "name": str(c["name"])}
                for c in sorted(run.train_ds.coco["categories"], key=lambda c: c["id"])
            ],
        )


def _log_eval(run: _Run, model: nn.Module, board: _Board) -> tuple[dict, list]:
    """Evaluate ``model`` on the validation split: a row of eval.csv, TensorBoard scalars and attention
    figure; returns the scores and the detections."""
    scores, dets = evaluate_model(model, run.val_ds(), protocol=run.protocol, device=run.device)
    _append_csv(
        run.out_dir / "eval.csv",
        {"iteration": run.it, "train_seconds": round(run.train_seconds, 2), **scores},
    )
    board.scalars(run.it, scores, "val")
    board.attention(run.it, model, run.val_ds(), run.cfg)
    return scores, dets


def _finish(run: _Run, board: _Board) -> dict:
    """The final metrics; rank 0 evaluates the run and writes its detections, mechanisms and run files."""
    metrics = {"iterations": run.it, "train_seconds": round(run.train_seconds, 2)}
    if run.main_process:
        eval_model = run.eval_model
        scores, dets = _log_eval(run, eval_model, board)
        metrics = {**scores, **metrics}
        atomic_write_json(run.out_dir / "detections_val.json", dets, indent=None)

        atomic_write_json(
            run.out_dir / "mechanisms.json",
            measure(
                eval_model, run.criterion, run.val_ds(), run.cfg.loss.eta_per_layer, run.log_path, run.device
            ),
        )
        tc = run.cfg.train
        write_run(
            run.out_dir,
            run.cfg,
            metrics,
            seed=tc.seed,
            wall_seconds=run.train_seconds,
            device=str(run.device),
        )
    return metrics


# settings a resumed run may change: they change bookkeeping or speed, not what is computed
RESUME_MAY_CHANGE = (
    "train.threads",
    "data.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.tensorboard",
)


def config_differences(stored: dict, requested: dict, prefix: str = "") -> list[str]:
    """``key: stored → requested`` for every leaf that differs between two config dicts, except
    :data:`RESUME_MAY_CHANGE`."""
    out = []
    for key in sorted(set(stored) | set(requested)):
        name = f"{prefix}{key}"
        a, b = stored.get(key), requested.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif (
            a != b
            and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b))
            and name not in RESUME_MAY_CHANGE
        ):
            out.append(f"{name}: {a!r} → {b!r}")
    return out


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep only the log rows up to ``iteration`` (a resumed run rewrites what came after). A run that
    starts from iteration 0 starts a new log: an existing log's header (e.g. of a committed run retrained
    for its weights) may lack columns that this code writes, and its columns would be kept."""
    if iteration == 0:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
    buf = io.StringIO()
    csv.writer(buf).writerows(keep)

    atomic_write_text(path, buf.getvalue())


class _LogWriter:
    """Appends one CSV row per logged iteration; columns fixed by the first row (or existing header)."""

    def __init__(self, path: Path):
        self.path = path
        self.fields = None
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", newline="")  # noqa: SIM115 (kept open for the whole run)

    def write(self, it, epoch, lr, loss, weighted: dict, images_per_s: float, train_seconds: float):
        row = {
            "iteration": it,
            "epoch": epoch,
            "lr": f"{lr:.6g}",
            "loss": f"{loss.item():.6g}",
            "images_per_s": f"{images_per_s:.3f}",
            "train_seconds": f"{train_seconds:.2f}",
        }
        row.update(
            {k: f"{v.item():.6g}" for k, v in weighted.items() if "_aux_" not in k and "_dn_" not in k}
        )
        totals: dict[str, torch.Tensor] = {}  # each term summed over every layer (aux, encoder, denoising)
        for k, v in weighted.items():
            totals[base_loss_name(k)] = totals.get(base_loss_name(k), 0.0) + v.detach()
        row.update({f"{k}_all": f"{v.item():.6g}" for k, v in totals.items()})
        if self.fields is None:
            self.fields = list(row)
            csv.writer(self.file).writerow(self.fields)
        csv.DictWriter(self.file, self.fields, restval="", extrasaction="ignore").writerow(row)
        self.file.flush()
        return row

    def close(self):
        self.file.close()


class _Board:
    """TensorBoard event files in ``<run>/tensorboard`` (``train.tensorboard``): every logged row of
    log.csv as scalars (``train/…``), the evaluation metrics (``val/…``) and, at each evaluation, the
    attention of the best-scoring query on the first validation image through the decoder layers
    (``attention/val_image_0``). log.csv and eval.csv stay the source the notebooks read. A resumed run
    purges the events after its checkpoint, as it truncates the CSV logs."""

    def __init__(self, out_dir: Path, start_iteration: int, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # events after the checkpoint's iteration are dropped, as _truncate_log drops those rows
            self.writer = SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=start_iteration + 1 if start_iteration else None
            )

    def scalars(self, it: int, row: dict, prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key in ("iteration", "epoch"):
                continue
            try:
                self.writer.add_scalar(f"{prefix}/{key}", float(value), it)
            except (TypeError, ValueError):
                continue

    def attention(self, it: int, model: nn.Module, dataset, cfg: RunConfig) -> None:
        if self.writer is None or len(dataset) == 0:
            return

        image = (dataset[0][0].clamp(0, 1) * 255).round().to(torch.uint8)
        size = cfg.data.image_size
        found = object_attention(model, image, size, objects=1)
        layers = list(range(cfg.model.num_decoder_layers))
        rows = figure_rows(
            found,
            cfg.model,
            size,
            tuple(image.shape[1:]),
            layers,
            [f"class {o['label']} {o['score']:.2f}" for o in found],
        )
        fig = plot_object_attention(image.permute(1, 2, 0).numpy(), rows, layers, title=f"iteration {it}")
        self.writer.add_figure("attention/val_image_0", fig, it, close=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
