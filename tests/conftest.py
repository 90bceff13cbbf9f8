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
