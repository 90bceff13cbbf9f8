"""The GPU benchmark's shape, run on the CPU with the smoke profile (the real one needs a lent GPU)."""

import math

import pytest
import torch

from sodlib.studies import bench


def test_gpu_bench_measures_each_precision_and_names_the_device():
    frame = bench.bench_gpu("smoke", batch=2, steps=1, warmup=1, device="cpu")
    assert list(frame.columns) == [
        "device", "profile", "image_size", "batch", "amp", "train_images_per_s", "train_peak_gib",
        "inference_images_per_s", "inference_peak_gib",
    ]  # fmt: skip
    assert frame["device"].tolist() == ["cpu"] * len(frame) and frame["batch"].tolist() == [2] * len(frame)
    assert frame["amp"].tolist()[-1] is False and len(set(frame["amp"])) == len(
        frame
    )  # float32 always measured
    assert (frame["train_images_per_s"] > 0).all() and (frame["inference_images_per_s"] > 0).all()
    assert all(math.isnan(v) for v in frame["train_peak_gib"])  # peak memory is read on CUDA only


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_bench_without_cuda_says_so_in_one_line():
    with pytest.raises(ValueError, match=r"^device 'cuda': CUDA is not available on this machine$"):
        bench.bench_gpu(device="cuda")
