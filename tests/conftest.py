"""Shared fixtures: every test writes into temporary folders, never into results/ or ~/.cache."""

from pathlib import Path

import pytest
import torch

from sodlib.data import shared_data_dir

SHARED_DATA = shared_data_dir()  # $SODLIB_SHARED_DATA or ../shared/data


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SODLIB_DATA", str(tmp_path_factory.mktemp("sodlib_data")))
    mp.setenv("SODLIB_RESULTS", str(tmp_path_factory.mktemp("sodlib_results")))
    torch.set_num_threads(1)
    yield
    mp.undo()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def smoke_detector():
    """The smoke profile's detector (seed 0) with its decoder weights nudged off their initialisation, so
    queries differ and sampling points spread; and the profile. Eval mode."""
    from sodlib.build import build_detector
    from sodlib.config import get_profile

    cfg = get_profile("smoke")
    torch.manual_seed(0)
    model = build_detector(cfg.model)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), cfg


@pytest.fixture
def put_run():
    """``put_run(folder, cfg, kind, ap, **metrics)``: a finished run of ``cfg`` in ``folder`` with AP (and,
    unless given, AP50/APS/APM) ``ap``, recorded as trained on machine kind ``kind``."""
    import json

    from sodlib.training.runs import write_run

    def put(folder, cfg, kind, ap, **metrics):
        values = {"AP": ap, "AP50": ap, "APS": ap, "APM": ap, "APL": -1.0, "iterations": 8} | metrics
        write_run(folder, cfg, values)
        prov = json.loads((folder / "provenance.json").read_text())
        (folder / "provenance.json").write_text(json.dumps({**prov, "machine_kind": kind}))

    return put
