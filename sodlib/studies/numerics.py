"""Where two kinds of machine part: checksums of every module's output and every parameter's gradient of one
step.

A training step of a code path (:func:`sodlib.studies.drift.guard_config`) is run on a fixed batch; each
module's forward output (in call order) and each parameter's gradient is hashed (SHA-256 of its float32
bytes). ``python -m sodlib.studies.numerics --record`` stores them for this kind of machine
(:func:`sodlib.hardware.machine_kind`) in ``results/numerics/<kind>.json``; ``--compare`` runs the step here
and names, per code path and recorded kind, the first module whose output differs and how many gradients
differ: the op where the machines part. Two machines of one kind give identical checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path

import torch

from sodlib.config import RunConfig
from sodlib.hardware import cpu_features, machine_kind, machine_slug
from sodlib.io import atomic_write_json
from sodlib.training.runs import default_results_dir, git_sha

__all__ = ["first_difference", "record", "step_checksums"]


def _digest(value) -> str | None:
    tensors = (
        [value]
        if isinstance(value, torch.Tensor)
        else ([v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else [])
    )
    if not tensors:
        return None
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def step_checksums(cfg: RunConfig, data_root: str | None = None) -> dict[str, dict[str, str]]:
    """``{"forward": {"<call index> <module>": digest}, "grad": {parameter: digest}, "loss": {term: repr}}``
    of the first training step of ``cfg`` (its seed, its first batch, one thread)."""
    from sodlib.build import build_criterion, build_detector
    from sodlib.data.datasets import build_dataset, collate_fn
    from sodlib.data.datastats import min_instance_size_px
    from sodlib.training.engine import _to_float32, epoch_batches

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    data = build_dataset(cfg.data, cfg.data.train_split, train=True, data_root=data_root)
    model, criterion = build_detector(cfg.model), build_criterion(cfg.loss, cfg.model)
    if (
        cfg.model.iah and cfg.model.iah_as_px == 0
    ):  # MRQM's A_s, measured on the training set as training does
        model.aux_head.set_min_instance_size(min_instance_size_px(data, cfg.data.image_size))
    forward: dict[str, str] = {}

    def hook(name):
        def record_output(module, inputs, output):
            digest = _digest(output)
            if digest is not None:
                forward[f"{len(forward):04d} {name}"] = digest

        return record_output

    handles = [m.register_forward_hook(hook(n or "model")) for n, m in model.named_modules()]
    batch = epoch_batches(len(data), cfg.train.batch_size, cfg.train.seed, 0)[0]
    images, targets = collate_fn([data[i] for i in batch])
    model.train()
    criterion.train()
    try:
        outputs = model(
            images, targets, return_sampling=criterion.needs_sampling, return_hidden=criterion.needs_hidden
        )
        terms = criterion(_to_float32(outputs), targets)
        criterion.weighted_total(terms).backward()
    finally:
        for h in handles:
            h.remove()
    grads = {
        n: _digest(p.grad) or "none" for n, p in [*model.named_parameters(), *criterion.named_parameters()]
    }
    return {
        "forward": forward,
        "grad": grads,
        "loss": {k: repr(float(v.detach())) for k, v in sorted(terms.items())},
    }


def first_difference(a: Mapping[str, Mapping[str, str]], b: Mapping[str, Mapping[str, str]]) -> str:
    """One line: the first module (call order) whose output differs between two checksum records, and how many
    forward outputs, gradients and loss terms differ; ``identical`` when none does."""
    counts = {
        k: sum(a[k].get(n) != b[k].get(n) for n in set(a[k]) | set(b[k])) for k in ("forward", "grad", "loss")
    }
    if not any(counts.values()):
        return "identical"
    first = next(
        (n.split(" ", 1)[1] for n in sorted(a["forward"]) if a["forward"][n] != b["forward"].get(n)), None
    )
    where = f"first differing module output: {first}" if first else "every module output agrees"
    return (
        f"{where}; {counts['forward']} of {len(a['forward'])} module outputs, {counts['grad']} of "
        f"{len(a['grad'])} gradients and {counts['loss']} of {len(a['loss'])} loss terms differ"
    )


def record(results_dir: Path | None = None) -> Path:
    """This kind of machine's checksums of every drift-guard code path, as
    ``results/numerics/<kind>.json``."""
    from sodlib.studies.drift import PATHS, guard_config

    results_dir = Path(results_dir or default_results_dir())
    doc = {
        "machine_kind": machine_kind(),
        "cpu": cpu_features(),
        "code": git_sha(),
        "torch": torch.__version__,
        "paths": {p: step_checksums(guard_config(p)) for p in PATHS},
    }
    return atomic_write_json(results_dir / "numerics" / f"{machine_slug()}.json", doc)


def compare(results_dir: Path | None = None) -> list[str]:
    """Per recorded kind of machine and code path, :func:`first_difference` against this machine's step."""
    from sodlib.studies.drift import PATHS, guard_config

    results_dir = Path(results_dir or default_results_dir())
    here = {p: step_checksums(guard_config(p)) for p in PATHS}
    lines = []
    for path in sorted((results_dir / "numerics").glob("*.json")):
        doc = json.loads(path.read_text())
        for p, rec in doc["paths"].items():
            if p in here:
                lines.append(f"{doc['machine_kind']} / {p}: {first_difference(rec, here[p])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sodlib.studies.numerics", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--record", action="store_true", help="write results/numerics/<this kind of machine>.json"
    )
    parser.add_argument(
        "--compare", action="store_true", help="compare this machine with every recorded kind"
    )
    args = parser.parse_args(argv)
    if args.record:
        print(record())
    if args.compare:
        print("\n".join(compare()) or "no kind of machine recorded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
