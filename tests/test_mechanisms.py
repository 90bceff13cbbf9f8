"""Paper A's mechanism diagnostics on hand-made sampling points, logs and a tiny trained run."""

import json
import math

import pytest
import torch

from sodlib.config import get_profile, override
from sodlib.training import mechanisms as M


def test_outside_expanded_box_hand_made_points():
    # one positive query, box centred at (0.5, 0.5), 0.2 x 0.2; η = 1.2 -> expanded half-size 0.6 box units
    ref = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])  # [B=1, Q=2, 4]
    offsets_box_units = torch.tensor(
        [[0.0, 0.25], [0.55, 0.0], [0.7, 0.0], [0.0, -0.65]]
    )  # inside, inside, out, out
    loc = torch.zeros(1, 2, 1, 1, 4, 2)  # [B, Q, heads, levels, points, 2]
    loc[0, 0, 0, 0] = ref[0, 0, :2] + offsets_box_units * ref[0, 0, 2:]
    loc[0, 1, 0, 0] = 5.0  # far outside, but query 1 is not positive
    mask = torch.tensor([[True, False]])
    assert M.outside_expanded_box(loc, ref, 1.2, mask) == (2, 4)
    assert M.outside_expanded_box(loc, ref, 1.0, mask) == (3, 4)  # 0.55 > 0.5: outside the box itself
    assert M.outside_expanded_box(loc, ref, 2.0, mask) == (0, 4)
    assert M.outside_expanded_box(loc, ref, 1.2, torch.zeros(1, 2, dtype=torch.bool)) == (0, 0)


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert M.spearman(x, x**3) == pytest.approx(1.0)
    assert M.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(M.spearman(x[:2], x[:2])) and math.isnan(M.spearman(x, torch.ones(4)))


def test_spr_loss_share_reads_the_last_quarter(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "iteration,loss,loss_offset_all,loss_atten_all\n10,10,5,5\n50,10,1,0\n80,8,1,1\n100,10,0.5,0.5\n"
    )
    # iterations > 75: shares 2/8 and 1/10
    assert M.spr_loss_share(log) == pytest.approx((0.25 + 0.1) / 2)
    log.write_text("iteration,loss\n100,10\n")  # a run without SPR
    assert M.spr_loss_share(log) == 0.0


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    from sodlib.training.engine import train

    out = {}
    for name, sets in {"base": (), "full": ("loss.st=true", "loss.sr=true", "loss.spr=true")}.items():
        d = tmp_path_factory.mktemp(name)
        train(override(get_profile("smoke"), "train.max_iters=3", *sets), d, progress=False)
        out[name] = json.loads((d / "mechanisms.json").read_text())
        out[f"{name}_dir"] = d
    return out


def test_training_writes_the_mechanisms(smoke_runs):
    base, full = smoke_runs["base"], smoke_runs["full"]
    layers = get_profile("smoke").model.num_decoder_layers
    for found in (base, full):
        assert {f"spr_outside_share_l{i}" for i in range(layers)} <= set(found)
        assert all(0.0 <= found[f"spr_outside_share_l{i}"] <= 1.0 for i in range(layers))
        assert {"st_gap_eS", "st_gap_rS", "st_gap_gS", "st_gap_N", "spr_loss_share"} <= set(found)
    # without ST the target is the IoU itself: no gap; with ST it differs from the IoU
    assert all(base[k] == 0.0 for k in base if k.startswith("st_gap") and not math.isnan(base[k]))
    assert any(full[k] != 0.0 for k in full if k.startswith("st_gap") and not math.isnan(full[k]))
    assert "sr_difficulty_spearman" not in base and -1.0 <= full["sr_difficulty_spearman"] <= 1.0
    assert base["spr_loss_share"] == 0.0 and full["spr_loss_share"] >= 0.0


def test_measure_run_recomputes_what_training_wrote(smoke_runs):
    folder = smoke_runs["full_dir"]
    written = json.loads((folder / "mechanisms.json").read_text())
    (folder / "mechanisms.json").unlink()
    assert json.loads(M.measure_run(folder).read_text()) == pytest.approx(written, nan_ok=True)


def test_mechanisms_frame(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mechanisms.json").write_text('{"spr_loss_share": 0.1, "st_gap_eS": 0.2}')
    df = M.mechanisms_frame([("row A", 0, tmp_path / "a"), ("row B", 1, tmp_path / "missing")])
    assert list(df.columns) == ["metric", "row", "seed", "value"]
    assert df.to_dict("records") == [
        {"metric": "spr_loss_share", "row": "row A", "seed": 0, "value": 0.1},
        {"metric": "st_gap_eS", "row": "row A", "seed": 0, "value": 0.2},
    ]
