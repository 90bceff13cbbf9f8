"""What the machine can do: native bf16 on the CPU, its features in one line, and the check of ``train.amp``.

:func:`cpu_has_native_bf16` reads ``/proc/cpuinfo`` once: x86 CPUs with ``avx512_bf16`` or ``amx_bf16`` and
aarch64 CPUs with the ``bf16`` feature run bf16 autocast natively; elsewhere it is emulated, about 10x slower
than float32. Where ``/proc/cpuinfo`` is missing (macOS, Windows) it answers False. :func:`cpu_features`
names the machine by cores, architecture and those flags, for results text and provenance;
:func:`machine_kind` names what picks the float32 kernels a training runs (vendor, torch's CPU capability, ISA
flags): two machines of one kind retrain a run to the same bits, machines of two kinds may not.
:func:`check_amp` is what training runs before any work: it refuses ``train.amp`` where autocast cannot run
and warns once per process where it runs emulated. Foundation layer: imports nothing from sodlib.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch
from torch.amp.autocast_mode import is_autocast_available

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; aarch64 Features
# the flags cpu_features names, in this order (x86: vector width and bf16 units; aarch64: SIMD, SVE, bf16)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


def _read_cpuinfo(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text: x86's ``flags`` line or aarch64's
    ``Features`` line (empty when there is neither)."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16(cpuinfo_path: str | os.PathLike = CPUINFO) -> bool:
    """Whether the CPU computes bf16 natively (x86 ``avx512_bf16`` / ``amx_bf16``, aarch64 ``bf16``), read
    from ``cpuinfo_path`` once per process; False where the file is missing or names no such flag."""
    return bool(cpu_flags(_read_cpuinfo(cpuinfo_path)) & NATIVE_BF16_FLAGS)


def cpu_features(cpuinfo_path: str | os.PathLike = CPUINFO) -> str:
    """The machine in one line, e.g. ``"2 cores, x86_64, avx2 avx512f avx512_bf16 amx_bf16"`` (logical cores;
    only the flags of :data:`REPORTED_FLAGS` it has; no flags where ``cpuinfo_path`` is missing)."""
    flags = cpu_flags(_read_cpuinfo(cpuinfo_path))
    named = " ".join(f for f in REPORTED_FLAGS if f in flags)
    return ", ".join(p for p in (f"{os.cpu_count() or 1} cores", platform.machine() or "unknown", named) if p)


# the flags that select oneDNN's and MKL's float32 kernels (vector width, FMA, AMX tiles) and aarch64's
# SIMD units
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "asimd",
    "sve",
)


def cpu_vendor(cpuinfo_text: str) -> str:
    """x86's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``) or aarch64's ``CPU implementer``
    (``arm-0x41``); ``unknown`` when the text names neither."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "vendor_id":
            return value.strip()
        if sep and key.strip() == "CPU implementer":
            return f"arm-{value.strip()}"
    return "unknown"


def machine_kind(cpuinfo_path: str | os.PathLike = CPUINFO) -> str:
    """What picks the float32 kernels of a training on this CPU, in one line: vendor, architecture, torch's
    vectorised-kernel capability and the :data:`KERNEL_FLAGS` present, e.g.
    ``"GenuineIntel x86_64 AVX512 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16
    amx_tile"``. MKL and oneDNN choose their code paths from the vendor and these flags, ATen from the
    capability."""
    text = _read_cpuinfo(cpuinfo_path)
    flags = cpu_flags(text)
    named = [f for f in KERNEL_FLAGS if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return " ".join([cpu_vendor(text), platform.machine() or "unknown", capability, *named])


def machine_slug(kind: str | None = None) -> str:
    """``kind`` (default: this machine's :func:`machine_kind`) as a file name: runs of other characters ->
    ``_``."""
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", kind or machine_kind()).strip("_")


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning(
        "train.amp=true: bf16 autocast is emulated on this CPU (%s), ~10x slower than float32 (measured "
        "6.4 s vs 0.60 s per step of the cpu profile on a 2-core AVX2 CPU); turn it off with "
        "--set train.amp=false",
        cpu_features(),
    )


def check_amp(amp: bool, device: str | torch.device) -> None:
    """Refuse ``train.amp`` where bf16 autocast cannot run on ``device`` (``ValueError``); warn once per
    process where it runs emulated (a CPU without native bf16). Nothing happens with ``amp`` off."""
    if not amp:
        return
    device = torch.device(device)
    if not is_autocast_available(device.type):
        raise ValueError(
            f"train.amp=true: bf16 autocast is not available for device {str(device)!r}; set train.amp=false"
        )
    if device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.amp=true: device {str(device)!r} does not support bf16; set train.amp=false")
    if device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
