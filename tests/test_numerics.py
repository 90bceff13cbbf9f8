"""Checksums of one training step: equal on one machine, and they name the first module where two runs
part."""

import json
import os
import subprocess
import sys

from sodlib.studies import numerics
from sodlib.studies.drift import guard_config


def test_one_step_is_identical_twice_and_covers_every_gradient():
    cfg = guard_config("st_sr_spr")
    a, b = numerics.step_checksums(cfg), numerics.step_checksums(cfg)
    assert numerics.first_difference(a, b) == "identical"
    assert len(a["forward"]) > 50 and all(
        v != "none" for k, v in a["grad"].items() if k.startswith("backbone")
    )
    assert {"loss_vfl", "loss_offset", "loss_atten", "loss_sr_gen"} <= set(a["loss"])


def test_first_difference_names_the_first_module_in_call_order():
    a = {
        "forward": {"0000 backbone": "1", "0001 encoder": "2", "0002 decoder": "3"},
        "grad": {"w": "a", "v": "b"},
        "loss": {"l": "0.5"},
    }
    b = {
        "forward": {"0000 backbone": "1", "0001 encoder": "X", "0002 decoder": "Y"},
        "grad": {"w": "a", "v": "c"},
        "loss": {"l": "0.5"},
    }
    assert numerics.first_difference(a, b) == (
        "first differing module output: encoder; 2 of 3 module outputs, 1 of 2 gradients and 0 of 1 "
        "loss terms differ"
    )
    only_grads = {**a, "grad": {"w": "z", "v": "b"}}
    assert numerics.first_difference(a, only_grads).startswith("every module output agrees; 0 of 3")


def test_scalar_kernels_part_from_vectorised_ones_and_the_record_says_where(tmp_path):
    """ATen's scalar kernels (ATEN_CPU_CAPABILITY=default) stand for another kind of machine."""
    code = (
        "import json, sys; from sodlib.studies import numerics; "
        "from sodlib.studies.drift import guard_config; "
        "json.dump(numerics.step_checksums(guard_config('baseline')), sys.stdout)"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    scalar = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    here = numerics.step_checksums(guard_config("baseline"))
    line = numerics.first_difference(here, scalar)
    assert line.startswith("first differing module output: ") and "gradients" in line
