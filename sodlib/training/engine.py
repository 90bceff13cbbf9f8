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
import logging
import os
import random
import time
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
    """Refuse, before any training, a train split the run cannot learn from or evaluate: no annotation at all, or
    a category count other than ``model.num_classes`` (labels beyond it cannot be trained, classes beyond the
    data's cannot be named at evaluation)."""
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
    A run folder trains in one process at a time: a second process is refused (``LockedError``) naming the holder.
    """
    check_amp(
        cfg.train.amp, cfg.train.device
    )  # before any work: bf16 autocast where it cannot run, or runs emulated
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
    import json

    out_dir = Path(out_dir)
    stored_metrics = read_metrics(out_dir) if resume else None  # a corrupt metrics.json is moved aside
    if stored_metrics is not None:
        stored = (
            json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else None
        )
        if stored is not None and RunConfig.from_dict(stored).canonical() != cfg.canonical():
            raise ValueError(f"{out_dir} holds a run of a different config; choose another folder")
        if not need_checkpoint or (out_dir / "checkpoints" / "last.pt").exists():
            log.info("%s already finished; returning its stored metrics", out_dir)
            return stored_metrics

    tc = cfg.train
    code_sha()  # provenance names the code this process loaded, not the commit the tree reached at the end
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

    batches_per_epoch = len(epoch_batches(len(train_ds), tc.batch_size, tc.seed, 0, rank, world))
    if batches_per_epoch == 0:
        raise ValueError(
            f"train split has {len(train_ds)} images, fewer than train.batch_size={tc.batch_size}"
        )
    total_iters = tc.epochs * batches_per_epoch
    if tc.max_iters:
        if tc.max_iters > total_iters and main_process:
            log.warning(
                "train.max_iters=%d is more than train.epochs=%d allow (%d batches per epoch): training "
                "stops at %d iterations; raise train.epochs to train longer",
                tc.max_iters,
                tc.epochs,
                batches_per_epoch,
                total_iters,
            )
        total_iters = min(total_iters, tc.max_iters)

    ckpt_path = out_dir / "checkpoints" / "last.pt"
    log_path = out_dir / "log.csv"
    it, epoch, batch_in_epoch, train_seconds = 0, 0, 0, 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        # through RunConfig, so that fields added since the checkpoint was written take their defaults
        changed = config_differences(RunConfig.from_dict(state.get("config") or {}).to_dict(), cfg.to_dict())
        if changed:
            raise ValueError(
                f"{ckpt_path} holds an interrupted run of another config ({'; '.join(changed[:4])}"
                f"{'; ...' if len(changed) > 4 else ''}); resume it with the same settings, or start "
                f"over with --no-resume or another --out"
            )
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        it, epoch, batch_in_epoch = state["iteration"], state["epoch"], state["batch_in_epoch"]
        train_seconds = float(state["train_seconds"])
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        log.info("resumed from %s at iteration %d", ckpt_path, it)
    if main_process:
        _truncate_log(log_path, it)

    def checkpoint():
        # a finite loss can still leave exploding weights: never replace the last good checkpoint with those
        bad = next(
            (
                name
                for name, p in model.state_dict().items()
                if p.is_floating_point() and not bool(torch.isfinite(p).all())
            ),
            None,
        )
        if _any_rank(bad is not None, device):
            raise NonFiniteLossError(
                f"non-finite weights at iteration {it} ({bad or 'on another rank'}); the last checkpoint with "
                f"finite weights is {ckpt_path if ckpt_path.exists() else 'none yet'}"
            )
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if main_process:
            save_checkpoint(
                ckpt_path,
                model=model.state_dict(),
                criterion=criterion.state_dict(),
                optimizer=optimizer.state_dict(),
                ema=ema.state_dict() if ema else None,
                iteration=it,
                epoch=epoch,
                batch_in_epoch=batch_in_epoch,
                train_seconds=train_seconds,
                rng=rngs,
                config=cfg.to_dict(),
                categories=[
                    {"id": int(c["id"]), "name": str(c["name"])}
                    for c in sorted(train_ds.coco["categories"], key=lambda c: c["id"])
                ],
            )

    _val = []

    def val_ds():
        if not _val:
            _val.append(build_dataset(cfg.data, cfg.data.val_split, train=False, data_root=data_root))
        return _val[0]

    if main_process:
        _truncate_log(out_dir / "eval.csv", it)
    show = None if (progress and main_process) else True  # None: tqdm turns itself off when not on a TTY
    bar = tqdm(total=total_iters, initial=it, desc=f"train {cfg.name}", disable=show, dynamic_ncols=True)
    writer = _LogWriter(log_path) if main_process else None
    board = _Board(out_dir, it, main_process and tc.tensorboard)
    clip_params = [*model.parameters(), *criterion.parameters()]  # built once, not every step
    ddp_model.train()
    criterion.train()
    stop = it >= total_iters
    while not stop and epoch < tc.epochs:
        batches = epoch_batches(len(train_ds), tc.batch_size, tc.seed, epoch, rank, world)[batch_in_epoch:]
        # the loader's own generator keeps worker seeding off the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(
            train_ds,
            batch_sampler=batches,
            collate_fn=collate_fn,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(tc.seed * 100_003 + epoch),
        )
        t_last = time.perf_counter()
        for images, targets in loader:
            images, targets = _to_device(images, targets, device)
            if tc.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if tc.multiscale:
                size = tc.multiscale[int(torch.randint(len(tc.multiscale), (1,)))]
                images = nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False
                )
            lr = set_lr(optimizer, lr_factor(it, tc, total_iters))
            # bf16 autocast on CUDA and on CPUs with bf16 units; the loss is computed in float32
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.amp):
                outputs = ddp_model(
                    images,
                    targets,
                    return_sampling=criterion.needs_sampling,
                    return_hidden=criterion.needs_hidden,
                )
            loss_dict = criterion(_to_float32(outputs), targets)
            loss = criterion.weighted_total(loss_dict)
            if _any_rank(not bool(torch.isfinite(loss)), device):
                bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {it} (terms: {', '.join(bad) or 'total'}); "
                    f"the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip_max_norm > 0:
                nn.utils.clip_grad_norm_(clip_params, tc.clip_max_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            it += 1
            batch_in_epoch += 1
            now = time.perf_counter()
            step_s, t_last = now - t_last, now
            train_seconds += step_s
            if writer is not None and (it % tc.log_every == 0 or it == 1):
                row = writer.write(
                    it,
                    epoch,
                    lr,
                    loss,
                    criterion.weighted(loss_dict),
                    tc.batch_size * world / step_s,
                    train_seconds,
                )
                board.scalars(it, row, "train")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            if tc.time_budget_s and train_seconds >= tc.time_budget_s:
                stop = True
            if it >= total_iters or (stop_after is not None and it >= stop_after):
                stop = True
            if main_process and tc.eval_every and it % tc.eval_every == 0 and not stop:
                _log_eval(
                    out_dir / "eval.csv",
                    it,
                    train_seconds,
                    val_ds(),
                    ema.module if ema else model,
                    protocol,
                    device,
                    board,
                    cfg,
                )  # evaluation gives the model back in training mode
            if stop or it % tc.checkpoint_every == 0:
                checkpoint()
            t_last = time.perf_counter()  # checkpoint and evaluation time is not training time
            if stop:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if writer is not None:
        writer.close()
    if (
        stop_after is not None
        and it < total_iters
        and not (tc.time_budget_s and train_seconds >= tc.time_budget_s)
    ):
        board.close()
        return {"iterations": it, "train_seconds": train_seconds, "interrupted": True}

    metrics = {"iterations": it, "train_seconds": round(train_seconds, 2)}
    if main_process:
        eval_model = ema.module if ema is not None else model
        scores, dets = evaluate_model(eval_model, val_ds(), protocol=protocol, device=device)
        _append_csv(
            out_dir / "eval.csv", {"iteration": it, "train_seconds": round(train_seconds, 2), **scores}
        )
        board.scalars(it, scores, "val")
        board.attention(it, eval_model, val_ds(), cfg)
        metrics = {**scores, **metrics}
        atomic_write_json(out_dir / "detections_val.json", dets, indent=None)

        atomic_write_json(
            out_dir / "mechanisms.json",
            measure(eval_model, criterion, val_ds(), cfg.loss.eta_per_layer, log_path, device),
        )
        write_run(out_dir, cfg, metrics, seed=tc.seed, wall_seconds=train_seconds, device=str(device))
    board.close()
    _barrier()
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


def _log_eval(
    path: Path,
    it: int,
    train_seconds: float,
    dataset,
    model,
    protocol: str,
    device,
    board: _Board,
    cfg: RunConfig,
) -> None:

    scores, _ = evaluate_model(model, dataset, protocol=protocol, device=device)
    _append_csv(path, {"iteration": it, "train_seconds": round(train_seconds, 2), **scores})
    board.scalars(it, scores, "val")
    board.attention(it, model, dataset, cfg)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep only the log rows up to ``iteration`` (a resumed run rewrites what came after). A run that starts
    from iteration 0 starts a new log: an earlier run's header (e.g. a committed run retrained for its weights,
    logged by older code) would drop the columns today's code writes."""
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
    """TensorBoard event files in ``<run>/tensorboard`` (``train.tensorboard``): every logged row of log.csv as
    scalars (``train/…``), the evaluation metrics (``val/…``) and, at each evaluation, the attention of the
    best-scoring query on the first validation image through the decoder layers (``attention/val_image_0``).
    log.csv and eval.csv stay the source the notebooks read. A resumed run purges the events after its
    checkpoint, as it truncates the CSV logs."""

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
