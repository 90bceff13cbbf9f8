"""Native-bf16 detection from /proc/cpuinfo texts, the machine line, and the check of train.amp."""

import logging
import os
import platform

import pytest
import torch

from sodlib import hardware

AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 adx sha_ni
bogomips\t: 4900.00

processor\t: 1
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 adx sha_ni
"""
AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_vnni avx512_bf16 avx512_vbmi2
"""
AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8
"""
AVX512_NO_BF16 = """processor\t: 0
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni
"""
AARCH64_BF16 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve i8mm bf16 rng
CPU implementer\t: 0x41
"""
AARCH64 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
"""


def _cpuinfo(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "native"),
    [
        (AVX2, False),
        (AVX512_BF16, True),
        (AMX, True),
        (AVX512_NO_BF16, False),
        (AARCH64_BF16, True),
        (AARCH64, False),
        ("", False),
    ],
)
def test_native_bf16_from_cpuinfo(tmp_path, text, native):
    assert hardware.cpu_has_native_bf16(_cpuinfo(tmp_path, text)) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert hardware.cpu_has_native_bf16(tmp_path / "missing") is False


def test_flags_are_the_first_processors_flags_or_features_line():
    assert hardware.cpu_flags(AVX2) == {
        "fpu",
        "vme",
        "sse",
        "sse2",
        "ssse3",
        "sse4_1",
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "adx",
        "sha_ni",
    }
    assert "bf16" in hardware.cpu_flags(AARCH64_BF16) and "asimd" in hardware.cpu_flags(AARCH64_BF16)
    assert hardware.cpu_flags("model name\t: CPU with flags: none\n") == frozenset()


def test_cpu_features_names_cores_architecture_and_flags(tmp_path):
    cores = f"{os.cpu_count()} cores"
    machine = platform.machine()
    assert hardware.cpu_features(_cpuinfo(tmp_path, AMX)) == f"{cores}, {machine}, avx2 avx512f amx_bf16"
    assert hardware.cpu_features(_cpuinfo(tmp_path, AVX2)) == f"{cores}, {machine}, avx2"
    assert hardware.cpu_features(_cpuinfo(tmp_path, AARCH64_BF16)) == f"{cores}, {machine}, asimd sve bf16"
    assert hardware.cpu_features(tmp_path / "missing") == f"{cores}, {machine}"


@pytest.fixture
def emulated_bf16(monkeypatch):
    """A CPU without native bf16, and a process that has not warned yet."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    hardware._warn_emulated_bf16.cache_clear()
    yield
    hardware._warn_emulated_bf16.cache_clear()


def test_emulated_bf16_warns_once_in_one_line(emulated_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="sodlib.hardware"):
        for _ in range(3):
            hardware.check_amp(True, "cpu")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message
    assert "emulated" in message and "6.4 s vs 0.60 s" in message and "--set train.amp=false" in message


def test_no_warning_with_amp_off_or_native_bf16(emulated_bf16, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="sodlib.hardware"):
        hardware.check_amp(False, "cpu")
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
        hardware.check_amp(True, "cpu")
    assert caplog.records == []


def test_amp_where_autocast_cannot_run_is_refused():
    with pytest.raises(ValueError, match=r"^train\.amp=true: .*'meta'") as err:
        hardware.check_amp(True, "meta")
    assert "\n" not in str(err.value)
    hardware.check_amp(False, "meta")  # amp off: nothing to check


def test_cuda_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match=r"^train\.amp=true: device 'cuda:1' does not support bf16"):
        hardware.check_amp(True, "cuda:1")


def test_machine_kind_names_vendor_capability_and_kernel_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n"
    )
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert (
        hardware.machine_kind(info) == f"AuthenticAMD {platform.machine()} AVX512 avx2 fma avx512f avx512bw"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n")
    assert hardware.machine_kind(arm).split()[0] == "arm-0x41"
    assert hardware.machine_kind(arm).endswith("asimd sve")
    assert hardware.machine_kind(tmp_path / "missing").split()[0] == "unknown"
