"""Benchmarks: throughput and timing ratios measured side by side in one process.

``sodlib bench data`` → ``results/bench/data.csv`` (columns benchmark, variant, value, unit):
SynthSOD generation images/s, loader + augmentation images/s at the cpu profile's working size, and
evaluation seconds for a VisDrone-sized set per protocol and backend (with the speed-up of
faster-coco-eval over pycocotools and the largest metric difference between them).
Numbers are medians over repeats; nothing here is a test.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from sodlib.runs import atomic_write_text


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_data(repeats: int = 3, num_synth: int = 32, num_loader: int = 64) -> pd.DataFrame:
    from sodlib import synth
    from sodlib.config import get_profile
    from sodlib.datasets import CocoDetection
    from sodlib.evaluation import evaluate, make_eval_benchmark_set
    from sodlib.transforms import build_transforms

    rows = []
    size = get_profile("cpu").data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        t = _median_time(lambda: synth.write_split(tmp, "train", num_synth, size, seed=0, progress=False), repeats)
        rows.append(("synthsod_generation", f"{size}px", num_synth / t, "images/s"))
        ann = Path(tmp) / "annotations" / "instances_train.json"
        for train, name in ((True, "train_augment"), (False, "eval_resize")):
            ds = CocoDetection(Path(tmp) / "images" / "train", ann, transforms=build_transforms(size, train=train))
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


BENCHES = {"data": bench_data}


def run(what: str, out_dir: str | Path) -> Path:
    if what not in BENCHES:
        raise ValueError(f"unknown benchmark {what!r}; choose one of {sorted(BENCHES)}")
    df = BENCHES[what]()
    path = Path(out_dir) / f"{what}.csv"
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))
    return path
