"""Benchmarks: throughput and timing ratios measured side by side in one process.

``sodlib bench data`` → ``results/bench/data.csv`` (columns benchmark, variant, value, unit):
SynthSOD generation images/s, loader + augmentation images/s at the cpu profile's working size, and
evaluation seconds for a VisDrone-sized set per protocol and backend (with the speed-up of
faster-coco-eval over pycocotools and the largest metric difference between them).
``sodlib bench mrqm`` → ``results/bench/mrqm.csv`` from :func:`encoder_cost` (GFLOPs and latency of RT-DETR's
hybrid encoder, BiFPN + SAE and BiFPN + a naive deformable encoder; :func:`encoder_cost_summary` says it in
one sentence); ``sodlib bench gpu`` → ``results/bench/gpu.csv`` on a lent GPU (:func:`bench_gpu`: the
``paper`` profile's training and inference throughput and peak memory, named by the device); ``model``,
``methods`` and ``sahi``: see their functions.
Numbers are medians over repeats; nothing here is a test.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from sodlib.io import atomic_write_text

if TYPE_CHECKING:
    from torch import Tensor, nn

    from sodlib.config import ModelConfig, RunConfig


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_data(repeats: int = 3, num_synth: int = 32, num_loader: int = 64) -> pd.DataFrame:
    from sodlib.config import get_profile
    from sodlib.data import synth
    from sodlib.data.datasets import CocoDetection
    from sodlib.data.transforms import build_transforms
    from sodlib.evaluation.protocols import evaluate, make_eval_benchmark_set

    rows = []
    size = get_profile("cpu").data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        t = _median_time(
            lambda: synth.write_split(tmp, "train", num_synth, size, seed=0, progress=False), repeats
        )
        rows.append(("synthsod_generation", f"{size}px", num_synth / t, "images/s"))
        ann = Path(tmp) / "annotations" / "instances_train.json"
        for train, name in ((True, "train_augment"), (False, "eval_resize")):
            ds = CocoDetection(
                Path(tmp) / "images" / "train", ann, transforms=build_transforms(size, train=train)
            )
            n = min(num_loader, len(ds))

            def load(ds=ds, n=n):
                for i in range(n):
                    ds[i % len(ds)]

            t = _median_time(load, repeats)
            rows.append(("loader", f"{name}@{size}px", n / t, "images/s"))

    gt, dets = make_eval_benchmark_set()
    n_gt = len(gt["annotations"])
    t0 = time.perf_counter()
    evaluate(gt, dets, protocol="visdrone")
    rows.append(("evaluation", "visdrone/toolkit", time.perf_counter() - t0, "s"))
    for protocol in ("coco", "sodad"):
        results = {}
        for backend in ("pycocotools", "faster"):
            t0 = time.perf_counter()
            results[backend] = evaluate(gt, dets, protocol=protocol, backend=backend)
            elapsed = time.perf_counter() - t0
            rows.append(("evaluation", f"{protocol}/{backend}", elapsed, "s"))
        ref, fast = results["pycocotools"], results["faster"]
        t_ref = rows[-2][2]
        rows.append(("evaluation", f"{protocol}/speedup_faster_vs_pycocotools", t_ref / rows[-1][2], "x"))
        diff = max(abs(ref[k] - fast[k]) for k in ref)
        rows.append(("evaluation", f"{protocol}/max_abs_metric_diff", diff, "AP"))
    rows.append(("evaluation", "set_size", len(gt["images"]), f"images ({n_gt} GT, {len(dets)} dets)"))
    return pd.DataFrame(rows, columns=["benchmark", "variant", "value", "unit"])


def _synthetic_batch(batch: int, size: int, num_classes: int, objects: int = 20, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        wh = torch.rand(objects, 2, generator=g) * 0.08 + 0.02
        cxcy = torch.rand(objects, 2, generator=g) * 0.9 + 0.05
        targets.append(
            {"boxes": torch.cat([cxcy, wh], 1), "labels": torch.randint(num_classes, (objects,), generator=g)}
        )
    return images, targets


def make_train_step(cfg, images, targets, device: str = "cpu"):
    """(step, detector): one optimiser step of a fresh seeded detector + criterion on a fixed batch, on
    ``device`` (``images`` and ``targets`` already there)."""
    import torch

    from sodlib.build import build_criterion, build_detector
    from sodlib.training.engine import _to_float32
    from sodlib.training.optim import build_optimizer

    torch.manual_seed(0)
    model = build_detector(cfg.model).train().to(device)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    opt = build_optimizer(model, cfg.train, extra=criterion)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.train.amp):
            out = model(
                images,
                targets,
                return_sampling=criterion.needs_sampling,
                return_hidden=criterion.needs_hidden,
            )
        loss = criterion.weighted_total(criterion(_to_float32(out), targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def time_train_step(cfg, batch: int, steps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one optimiser step (forward, loss, backward, AdamW) on a synthetic batch,
    with the config's ``train.amp`` (bf16 autocast) and ``train.channels_last`` settings."""
    import torch

    images, targets = _synthetic_batch(batch, cfg.data.image_size, cfg.model.num_classes)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    step, _ = make_train_step(cfg, images, targets)
    for _ in range(warmup):
        step()
    return _median_time(step, steps)


def time_inference(cfg, batch: int, steps: int = 20, warmup: int = 3, model=None) -> float:
    """Median seconds of one eval-mode forward pass on a batch (``train.channels_last`` honoured)."""
    import torch

    from sodlib.build import build_detector

    torch.manual_seed(0)
    model = (model or build_detector(cfg.model)).eval()
    images, _ = _synthetic_batch(batch, cfg.data.image_size, cfg.model.num_classes)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(warmup):
            model(images)
        return _median_time(lambda: model(images), steps)


def time_onnxruntime(cfg, batch: int, steps: int = 20, warmup: int = 3, threads: int = 2) -> float:
    """Median seconds of one forward pass of the exported ONNX graph in onnxruntime (CPU provider, ``threads``
    intra-op threads) on the same synthetic batch as :func:`time_inference`."""
    import onnxruntime as ort
    import torch

    from sodlib.build import build_detector
    from sodlib.inference.export import export_onnx

    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    images, _ = _synthetic_batch(batch, cfg.data.image_size, cfg.model.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", cfg.data.image_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    return _median_time(lambda: session.run(None, feed), steps)


def count_gflops(cfg) -> float:
    """Forward GFLOPs of one image at the working size (torch.utils.flop_counter; 1 MAC = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sodlib.build import build_detector

    model = build_detector(cfg.model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size))
    return counter.get_total_flops() / 1e9


def bench_model(steps: int = 20, threads: int = 2) -> pd.DataFrame:
    """Training step and inference time per profile at its working size (PyTorch, and the exported ONNX graph
    in onnxruntime); deformable-attention core."""
    import torch

    from sodlib.build import build_detector
    from sodlib.config import get_profile, override
    from sodlib.models.deform_attn import benchmark_core

    torch.set_num_threads(threads)
    rows = []
    cpu = get_profile("cpu")
    paper = get_profile("paper")
    variants = {  # (profile, train batch, [(tag, overrides)]) — fp32 rows compare with RT-DETR's CPU anchor
        "cpu": (
            cpu,
            cpu.train.batch_size,
            [
                ("fp32", ("train.amp=false",)),
                ("bf16", ("train.amp=true",)),
                ("bf16_channels_last", ("train.amp=true", "train.channels_last=true")),
            ],
        ),
        "paper": (
            paper,
            2,
            [
                ("fp32", ("train.amp=false",)),
                ("fp32_channels_last", ("train.amp=false", "train.channels_last=true")),
            ],
        ),
    }
    for name, (cfg, train_batch, tags) in variants.items():
        n_params = sum(p.numel() for p in build_detector(cfg.model).parameters())
        rows.append((name, "parameters", n_params, "count"))
        rows.append((name, f"gflops_per_image@{cfg.data.image_size}px", count_gflops(cfg), "GFLOPs"))
        n = steps if name == "cpu" else max(5, steps // 4)
        for tag, sets in tags:
            c = override(cfg, *sets)
            t = time_train_step(c, train_batch, steps=n)
            rows.append((name, f"train_step_batch{train_batch}@{cfg.data.image_size}px_{tag}", t * 1e3, "ms"))
            if "bf16" not in tag:
                t = time_inference(c, 1, steps=n)
                rows.append((name, f"inference_batch1@{cfg.data.image_size}px_{tag}", t * 1e3, "ms/image"))
            if tag == "fp32":  # the exported graph beside PyTorch, same batch, same threads
                t_ort = time_onnxruntime(c, 1, steps=n, threads=threads)
                rows.append(
                    (
                        name,
                        f"inference_batch1@{cfg.data.image_size}px_onnxruntime_fp32",
                        t_ort * 1e3,
                        "ms/image",
                    )
                )
                rows.append((name, "onnxruntime_speedup_vs_pytorch_fp32", t / t_ort, "x"))
    for label, kwargs in (
        ("cpu_decoder", {}),
        (
            "paper_decoder",
            {"batch": 2, "queries": 500, "head_dim": 32, "spatial_shapes": ((80, 80), (40, 40), (20, 20))},
        ),
    ):
        res = benchmark_core(repeats=steps // 2, **kwargs)
        for impl, d in res.items():
            for k, v in d.items():
                rows.append(("ms_deform_attn_core", f"{label}/{impl}/{k}", v, "ms"))
        for k in ("forward_ms", "forward_backward_ms"):
            best = (
                min(res["gather"][k], res["grid_sample"][k]) if k == "forward_ms" else res["grid_sample"][k]
            )
            rows.append(
                ("ms_deform_attn_core", f"{label}/speedup_vs_loop/{k}", res["reference"][k] / best, "x")
            )
    return pd.DataFrame(rows, columns=["benchmark", "variant", "value", "unit"])


def bench_methods(steps: int = 24, warmup: int = 3, threads: int = 2) -> pd.DataFrame:
    """Paper A's claim that ST/SR/SPR only change the training objective, measured on the cpu profile.

    Each variant gets its own detector + criterion + optimiser; their steps are interleaved round by
    round so that machine noise hits all variants alike, and the median of ``steps`` rounds is used.
    ``train_step_ratio`` = (ST+SR+SPR) / baseline; ``inference_ratio`` = eval forward of the detector
    built for the full method / the baseline's (paper A: same graph, same speed).
    Columns metric, value.
    """
    import torch

    from sodlib.config import get_profile, override

    torch.set_num_threads(threads)
    base = get_profile("cpu")
    variants = {
        "baseline": (),
        "st": ("loss.st=true",),
        "sr": ("loss.sr=true",),
        "spr": ("loss.spr=true",),
        "st_sr_spr": ("loss.st=true", "loss.sr=true", "loss.spr=true"),
    }
    images, targets = _synthetic_batch(base.train.batch_size, base.data.image_size, base.model.num_classes)
    runners, models = {}, {}
    for name, sets in variants.items():
        runners[name], models[name] = make_train_step(override(base, *sets), images, targets)
    times = {k: [] for k in runners}
    for r in range(warmup + steps):
        for name, step in runners.items():
            t0 = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [(f"step_ms_{k}", v * 1e3) for k, v in med.items()]
    rows += [(f"{k}_step_ratio", med[k] / med["baseline"]) for k in ("st", "sr", "spr")]
    rows.append(("train_step_ratio", med["st_sr_spr"] / med["baseline"]))

    inf = {"baseline": [], "st_sr_spr": []}
    with torch.inference_mode():
        for m in (models["baseline"], models["st_sr_spr"]):
            m.eval()
        for r in range(warmup + steps):
            for name, times in inf.items():
                t0 = time.perf_counter()
                models[name](images[:1])
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
    inf_med = {k: statistics.median(v) for k, v in inf.items()}
    rows += [(f"inference_ms_{k}", v * 1e3) for k, v in inf_med.items()]
    rows.append(("inference_ratio", inf_med["st_sr_spr"] / inf_med["baseline"]))
    same = list(models["baseline"].state_dict()) == list(models["st_sr_spr"].state_dict())
    rows.append(("same_detector_parameters", float(same)))
    return pd.DataFrame(rows, columns=["metric", "value"])


def bench_mrqm(repeats: int = 3, threads: int = 2) -> pd.DataFrame:
    """MRQM's encoder-cost claim at the ``paper`` resolution: SAE vs RT-DETR's hybrid encoder vs a naive
    encoder that updates every level in every layer (GFLOPs, analytic sampling GFLOPs, latency)."""
    import torch

    from sodlib.config import get_profile, override

    torch.set_num_threads(threads)
    cfg = override(get_profile("paper"), "model.encoder=bifpn_sae", "model.num_levels=4")
    df = pd.DataFrame(encoder_cost(cfg, image_size=cfg.data.image_size, repeats=repeats))
    total = df["gflops"] + df["sampling_gflops"]
    naive = float(total[df["encoder"] == "bifpn_naive"].iloc[0])
    df["gflops_vs_bifpn_naive"] = total / naive
    return df


def bench_sahi(
    checkpoint: str = "", slice_size: int = 0, overlap: float = 0.2, threads: int = 2
) -> pd.DataFrame:
    """SAHI's sliced prediction against ``sodlib predict --slice`` on ../shared/data/visdrone_mini (8 images):
    detections, agreement with predict --slice, seconds (after one warm-up image), AP/AP50
    (visdrone protocol).

    ``checkpoint`` "" uses :func:`sodlib.studies.runner.visdrone_run`'s detector (trained on these eight
    images: its AP says that the detections are real objects, so that the pipelines' merges can be told apart,
    not how well it generalises); ``slice_size`` 0 = the checkpoint's training size (patches at native
    resolution, no resizing).
    """
    import torch

    from sodlib.data.formats import visdrone_to_coco
    from sodlib.data.realdata import find_visdrone_mini
    from sodlib.inference.sahi import compare_sliced
    from sodlib.studies.runner import visdrone_run

    root = find_visdrone_mini()
    if root is None:
        raise FileNotFoundError(
            "../shared/data/visdrone_mini: the VisDrone sample is not beside the repository"
        )
    if not checkpoint:
        _, run, _ = visdrone_run(verbose=False)
        checkpoint = str(run / "checkpoints" / "last.pt")
        name = f"visdrone_mini-trained detector ({run.name})"
    else:
        name = Path(checkpoint).parent.parent.name
    torch.set_num_threads(threads)
    rows = compare_sliced(
        checkpoint, sorted((root / "images").glob("*.jpg")), visdrone_to_coco(root), slice_size, overlap
    )
    slice_size = rows[0]["slice_size"]
    out = []
    for r in rows:
        for key, unit in (
            ("detections", "count"),
            ("agreement", "fraction"),
            ("seconds", "s"),
            ("AP", "fraction"),
            ("AP50", "fraction"),
        ):
            out.append(
                (f"sliced_{slice_size}_overlap{overlap:g}/{name}", f"{r['pipeline']}/{key}", r[key], unit)
            )
    base = rows[0]["seconds"]
    for r in rows[1:]:
        out.append(
            (
                f"sliced_{slice_size}_overlap{overlap:g}/{name}",
                f"{r['pipeline']}/time_vs_predict_slice",
                r["seconds"] / base,
                "x",
            )
        )
    return pd.DataFrame(out, columns=["benchmark", "variant", "value", "unit"])


def bench_gpu(
    profile: str = "paper", batch: int | None = None, steps: int = 20, warmup: int = 5, device: str = "cuda"
) -> pd.DataFrame:
    """The ``profile``'s training step and inference on ``device`` at its working size and batch (default the
    profile's), with its ``train.amp`` and in float32: images per second (median step) and peak memory
    allocated (GiB, CUDA only), one row each, named by the device. For a lent GPU: results/bench/gpu.csv."""
    import torch

    from sodlib.config import get_profile, override

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def measure(fn) -> tuple[float, float]:
        for _ in range(warmup):
            fn()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = _median_time(lambda: (fn(), sync()), steps)
        return seconds, (torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan"))

    base = get_profile(profile)
    n = batch or base.train.batch_size
    rows = []
    for amp in dict.fromkeys((base.train.amp, False)):
        cfg = override(base, f"train.amp={str(amp).lower()}")
        images, targets = _synthetic_batch(n, cfg.data.image_size, cfg.model.num_classes)
        images, targets = images.to(dev), [{k: v.to(dev) for k, v in t.items()} for t in targets]
        step, model = make_train_step(cfg, images, targets, device=device)
        train_s, train_mem = measure(step)
        model.eval()

        def forward(model=model, images=images, amp=amp):
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                model(images)

        infer_s, infer_mem = measure(forward)
        del model, step
        rows.append(
            {"device": name, "profile": profile, "image_size": cfg.data.image_size, "batch": n, "amp": amp,
             "train_images_per_s": n / train_s, "train_peak_gib": train_mem,
             "inference_images_per_s": n / infer_s, "inference_peak_gib": infer_mem}
        )  # fmt: skip
        if cuda:
            torch.cuda.empty_cache()
    return pd.DataFrame(rows)


BENCHES = {
    "gpu": bench_gpu,
    "data": bench_data,
    "model": bench_model,
    "methods": bench_methods,
    "mrqm": bench_mrqm,
    "sahi": bench_sahi,
}


def run(what: str, out_dir: str | Path) -> Path:
    if what not in BENCHES:
        raise ValueError(f"unknown benchmark {what!r}; choose one of {sorted(BENCHES)}")
    df = BENCHES[what]()
    path = Path(out_dir) / f"{what}.csv"
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))
    return path


def _flops_and_latency(module: nn.Module, inputs: list[Tensor], repeats: int) -> tuple[float, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(inputs)
        times = []
        for _ in range(repeats + 1):  # the first run is warm-up
            t0 = time.perf_counter()
            module(inputs)
            times.append(time.perf_counter() - t0)
    return counter.get_total_flops() / 1e9, statistics.median(times[1:]) * 1e3


def _sampling_gflops(cfg: ModelConfig, queries_per_layer: list[int], batch: int) -> float:
    """Bilinear sampling of deformable attention, which the flop counter does not see (grid_sample /
    embedding_bag): per query, head, level (4) and point 4 corners × head_dim multiply-adds."""
    head_dim = cfg.hidden_dim // cfg.num_heads
    per_query = cfg.num_heads * 4 * cfg.num_points * 4 * head_dim * 2  # 2 flops per multiply-add
    return batch * sum(queries_per_layer) * per_query / 1e9


def _encoders(m: ModelConfig, channels: tuple[int, ...]):
    """RT-DETR's hybrid encoder (on C3..C5), BiFPN + SAE and BiFPN + a naive deformable encoder (on C2..C5),
    in eval mode, for :func:`encoder_cost`."""
    from sodlib.models.bifpn import BiFPNSAEEncoder, NaiveDeformableEncoder
    from sodlib.models.encoder import HybridEncoder

    hybrid = HybridEncoder(channels[1:], hidden_dim=m.hidden_dim, num_heads=m.num_heads,
                           dim_feedforward=m.encoder_ffn, dropout=m.dropout, csp_blocks=m.csp_blocks,
                           expansion=m.expansion)  # fmt: skip
    layer = {"num_heads": m.num_heads, "num_points": m.num_points, "dim_feedforward": m.encoder_ffn,
             "dropout": m.dropout}  # fmt: skip
    bifpn = {"hidden_dim": m.hidden_dim, "bifpn_repeats": m.bifpn_repeats}
    sae = BiFPNSAEEncoder(channels, **bifpn, sae_high_updates=m.sae_high_updates, **layer)
    naive_pyramid = NaiveDeformableEncoder(
        m.hidden_dim, num_levels=4, num_layers=m.sae_high_updates + 1, **layer
    )
    naive = BiFPNSAEEncoder(channels, **bifpn, pyramid=naive_pyramid, **layer)
    return hybrid.eval(), sae.eval(), naive.eval()


def encoder_cost(
    cfg: RunConfig | ModelConfig, image_size: int = 640, batch: int = 1, repeats: int = 3, seed: int = 0
) -> list[dict]:
    """GFLOPs and latency of the encoders on the backbone maps of a random ``image_size`` image.

    Rows (``encoder``): ``hybrid`` (RT-DETR, C3..C5), ``bifpn`` (BiFPN alone, C2..C5), ``bifpn_sae``
    (BiFPN + SAE), ``bifpn_naive`` (BiFPN + naive deformable encoder), ``sae`` and ``naive`` (the pyramid
    encoders alone, on the BiFPN output). Columns: ``gflops`` (counted matmuls / convolutions),
    ``sampling_gflops`` (deformable sampling, analytic), ``latency_ms`` (median of ``repeats``, no grad,
    current thread count), ``params_m``, ``tokens`` (tokens the encoder's attention updates in total).
    """
    import torch

    from sodlib.build import build_backbone
    from sodlib.config import RunConfig

    m = cfg.model if isinstance(cfg, RunConfig) else cfg
    torch.manual_seed(seed)
    backbone = build_backbone(m, (2, 3, 4, 5)).eval()
    with torch.no_grad():
        feats = backbone(torch.rand(batch, 3, image_size, image_size))
    hybrid, sae, naive = _encoders(m, tuple(backbone.out_channels))
    with torch.no_grad():
        pyramid = sae.bifpn(feats)
    n = [x.shape[2] * x.shape[3] for x in pyramid]
    sae_queries = [sum(n[1:])] * m.sae_high_updates + [n[0]]
    naive_queries = [sum(n)] * (m.sae_high_updates + 1)
    cases = [
        ("hybrid", hybrid, feats[1:], [], n[-1]),
        ("bifpn", sae.bifpn, feats, [], 0),
        ("bifpn_sae", sae, feats, sae_queries, sum(sae_queries)),
        ("bifpn_naive", naive, feats, naive_queries, sum(naive_queries)),
        ("sae", sae.sae, pyramid, sae_queries, sum(sae_queries)),
        ("naive", naive.sae, pyramid, naive_queries, sum(naive_queries)),
    ]
    rows = []
    for name, module, inputs, queries, tokens in cases:
        gflops, ms = _flops_and_latency(module, inputs, repeats)
        rows.append(
            {
                "encoder": name,
                "image_size": image_size,
                "gflops": gflops,
                "sampling_gflops": _sampling_gflops(m, queries, batch),
                "latency_ms": ms,
                "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
                "tokens": int(tokens),
            }
        )
    return rows


def encoder_cost_summary(df: pd.DataFrame) -> str:
    """One sentence from :func:`encoder_cost` rows (or ``results/bench/mrqm.csv``): BiFPN + SAE against
    BiFPN + the naive encoder and RT-DETR's hybrid encoder, GFLOPs (counted + sampling) and latency."""
    t = df.set_index("encoder")
    total = t["gflops"] + t["sampling_gflops"]
    ms = t["latency_ms"]

    def _num(x: float) -> str:  # 3 significant digits, no exponent
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"

    size = int(t["image_size"].iloc[0])
    return (
        f"Encoder cost at {size} px: BiFPN+SAE {_num(total['bifpn_sae'])} GFLOPs, "
        f"{total['bifpn_sae'] / total['bifpn_naive']:.0%} of BiFPN + naive encoder "
        f"({_num(total['bifpn_naive'])}) and {total['bifpn_sae'] / total['hybrid']:.1f}× "
        f"RT-DETR's hybrid encoder ({_num(total['hybrid'])}); latency {_num(ms['bifpn_sae'])} ms "
        f"vs {_num(ms['bifpn_naive'])} ms (naive) and {_num(ms['hybrid'])} ms (hybrid). "
        f"The pyramid encoders alone: SAE {_num(total['sae'])} vs naive {_num(total['naive'])} GFLOPs "
        f"({t.loc['sae', 'tokens']} vs {t.loc['naive', 'tokens']} token updates)."
    )
