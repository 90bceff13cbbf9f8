"""Figure 5 from trained runs (sodlib.studies.figure5): the runs it draws, the in-box summary over seeds, the
stored per-run shares, and the panels it builds."""

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from sodlib.hardware import machine_slug
from sodlib.studies import figure5
from sodlib.studies.tables import MRQM_ABLATION_TABLES
from sodlib.training.runs import run_dir

matplotlib.use("Agg")


def test_profiles_and_paired_configs():
    from sodlib.studies.tables import comparison_profile

    assert [comparison_profile(p) for p in ("smoke", "cpu", "ablation", "paper")] == [
        "smoke",
        "ablation",
        "ablation",
        "paper",
    ]
    configs = figure5.figure5_configs("cpu", seeds=3)
    assert list(configs) == ["baseline", figure5.RETUNE, "ST+SR+SPR"]
    assert set(figure5.MODELS) <= set(configs) and {m for pair in figure5.COMPARISONS for m in pair} == set(
        configs
    )
    for base, retune in zip(configs["baseline"], configs[figure5.RETUNE]):  # the focal-loss retune alone
        assert (retune.loss.alpha, retune.loss.gamma, base.loss.alpha, base.loss.gamma) == (
            0.5,
            1.5,
            0.75,
            2.0,
        )
        assert retune.train == base.train and retune.model == base.model
        assert (retune.loss.st, retune.loss.sr, retune.loss.spr) == (False, False, False)
    # the baseline runs are MRQM Table 3's (same hash: read from the same cache)
    table3 = MRQM_ABLATION_TABLES[0]
    mrqm_baseline = [run_dir(c, "r") for row, _, c in table3.configs("ablation") if row.label == "baseline"]
    assert [run_dir(c, "r") for c in configs["baseline"]] == mrqm_baseline
    for base, full in zip(configs["baseline"], configs["ST+SR+SPR"]):
        assert (full.loss.alpha, full.loss.gamma) == (0.5, 1.5)
        assert full.train.seed == base.train.seed and full.train.max_iters == base.train.max_iters == 1000
        assert (full.loss.st, full.loss.sr, full.loss.spr) == (True, True, True)
        assert (base.loss.st, base.loss.sr, base.loss.spr) == (False, False, False)
    assert figure5.figure5_configs("smoke", seeds=1)["baseline"][0].train.max_iters != 1000
    with pytest.raises(ValueError, match="SEEDS"):
        figure5.figure5_configs("cpu", seeds=0)


def test_in_box_summary_by_hand():
    # two seeds, two layers; each seed's share is the mean over its objects
    base = [
        torch.tensor([[0.2, 0.4], [0.5, 0.7]]),
        torch.tensor([[0.1, 0.1], [0.4, 0.6]]),
    ]  # means .3 .6 / .1 .5
    full = [
        torch.tensor([[0.4, 0.4], [0.8, 0.8]]),
        torch.tensor([[0.2, 0.4], [0.6, 0.6]]),
    ]  # means .4 .8 / .3 .6
    s = figure5.in_box_summary({"baseline": base, "ST+SR+SPR": full})
    assert list(s["model"]) == ["baseline", "baseline", "ST+SR+SPR", "ST+SR+SPR"]
    assert s["mean"].tolist() == pytest.approx([0.2, 0.55, 0.35, 0.7])
    assert s["std"].tolist() == pytest.approx(
        [math.sqrt(0.02), math.sqrt(0.005), math.sqrt(0.005), math.sqrt(0.02)]
    )
    assert s["objects"].tolist() == [2] * 4 and s["seeds"].tolist() == [2] * 4
    full_rows = s[s["model"] == "ST+SR+SPR"]
    # layer 1: differences .1, .2 → mean .15, sd .0707, t(1) 12.706 · .0707/√2 = .6353
    assert full_rows["d_vs_baseline"].tolist() == pytest.approx([0.15, 0.15])
    assert full_rows["ci95_low"].iloc[0] == pytest.approx(
        0.15 - 12.7062 * math.sqrt(0.005) / math.sqrt(2), abs=1e-4
    )
    assert s[s["model"] == "baseline"]["d_vs_baseline"].isna().all()
    one = figure5.in_box_summary({"baseline": base[:1], "ST+SR+SPR": full[:1]})
    assert one["std"].isna().all() and one["ci95_low"].isna().iloc[-1]


def test_in_box_differences_pair_each_comparison_over_the_seeds_both_have():
    base = [torch.tensor([[0.2, 0.4], [0.5, 0.7]]), torch.tensor([[0.1, 0.1], [0.4, 0.6]])]  # .3 .6 / .1 .5
    retune = [torch.tensor([[0.3], [0.6]]), torch.tensor([[0.2], [0.5]])]  # .3 .6 / .2 .5
    full = [torch.tensor([[0.4, 0.4], [0.8, 0.8]]), torch.tensor([[0.2, 0.4], [0.6, 0.6]])]  # .4 .8 / .3 .6
    d = figure5.in_box_differences({"baseline": base, figure5.RETUNE: retune, "ST+SR+SPR": full})
    assert list(zip(d["model"], d["vs"])) == [
        ("ST+SR+SPR", "baseline"), ("ST+SR+SPR", "baseline"), (figure5.RETUNE, "baseline"),
        (figure5.RETUNE, "baseline"), ("ST+SR+SPR", figure5.RETUNE), ("ST+SR+SPR", figure5.RETUNE),
    ]  # fmt: skip
    # full − retune, layer 2: .8 − .6 = .2 and .6 − .5 = .1; retune − baseline, layer 1: 0 and .1
    assert d["d"].tolist() == pytest.approx([0.15, 0.15, 0.05, 0.0, 0.1, 0.15])
    half = 12.7062 * math.sqrt(0.005) / math.sqrt(2)  # sd of (.2, .1) is √.005, t(1) 12.706
    assert d["ci95_low"].iloc[-1] == pytest.approx(0.15 - half, abs=1e-4)
    p = 0.2048328  # two-sided t(1) p of a mean 3 standard errors from 0 (.15 over √.005/√2)
    assert d["p"].iloc[[1, 3, 5]].tolist() == pytest.approx([p, 1.0, p], abs=1e-6)
    # Holm over layer 2's three comparisons: 3p, then max(3p, 2p), then max(3p, 1.0)
    assert d["p_holm"].iloc[[1, 3, 5]].tolist() == pytest.approx([3 * p, 1.0, 3 * p], abs=1e-6)
    verdict = figure5.in_box_verdict(d)
    assert verdict.endswith(
        "0 of 3 resolved after Holm's correction over the layer's comparisons (level 0.05)."
    )
    assert verdict.startswith(
        "In-box attention share at the last decoder layer (layer 2): ST+SR+SPR − baseline"
    )
    assert (
        f"ST+SR+SPR − {figure5.RETUNE} +0.150 [{0.15 - half:+.3f}, {0.15 + half:+.3f}], "
        "p_holm 0.614 over 2 seeds" in verdict
    )
    two = figure5.in_box_differences({"baseline": base, "ST+SR+SPR": full[:1]})  # one pair, one common seed
    assert len(two) == 2 and two["seeds"].tolist() == [1, 1] and two["ci95_low"].isna().all()
    assert "(one seed)" in figure5.in_box_verdict(two)
    assert figure5.in_box_verdict(figure5.in_box_differences({"baseline": base})).startswith(
        "In-box share: no"
    )


def test_figure5_runs_are_read_on_the_kind_where_most_of_them_exist(tmp_path, put_run):
    from sodlib.hardware import machine_slug

    cfgs = figure5.figure5_configs("smoke", seeds=1)
    put_run(run_dir(cfgs["baseline"][0], tmp_path), cfgs["baseline"][0], "old", 0.3)
    put_run(run_dir(cfgs["ST+SR+SPR"][0], tmp_path), cfgs["ST+SR+SPR"][0], "old", 0.3)
    put_run(run_dir(cfgs[figure5.RETUNE][0], tmp_path), cfgs[figure5.RETUNE][0], "new", 0.3)
    folders = figure5.figure5_folders(cfgs, tmp_path)
    assert {k: v[0] for k, v in folders.items()} == {k: run_dir(v[0], tmp_path) for k, v in cfgs.items()}
    for label in ("baseline", "ST+SR+SPR"):  # both retrained whole on "new": every run exists there
        copy = tmp_path / "machines" / machine_slug("new") / "runs" / run_dir(cfgs[label][0]).name
        put_run(copy, cfgs[label][0], "new", 0.31)
    folders = figure5.figure5_folders(cfgs, tmp_path)
    assert folders["baseline"][0] == copy.parent / run_dir(cfgs["baseline"][0]).name
    assert folders["ST+SR+SPR"][0] == copy and folders[figure5.RETUNE][0] == run_dir(
        cfgs[figure5.RETUNE][0], tmp_path
    )
    assert figure5.figure5_folders(figure5.figure5_configs("smoke", seeds=2), tmp_path)["baseline"][
        1
    ] == run_dir(
        figure5.figure5_configs("smoke", seeds=2)["baseline"][1], tmp_path
    )  # not trained: its own folder


def test_stored_share_is_read_and_a_foreign_one_measured_again(tmp_path, monkeypatch):
    cfg = figure5.figure5_configs("smoke", seeds=1)["baseline"][0]
    d = run_dir(cfg, tmp_path)
    d.mkdir(parents=True)
    stored = {"split": cfg.data.val_split, "images": 4, "data": "", "share": [[0.25, 0.5], [0.75, 1.0]]}
    (d / figure5.SHARE_FILE).write_text(json.dumps(stored))

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(figure5, "train", no_training)
    share = figure5.run_in_box_share(cfg, tmp_path, 4)
    assert share.tolist() == [[0.25, 0.5], [0.75, 1.0]]
    with pytest.raises(AssertionError, match="trained"):  # other images: measured again, from the weights
        figure5.run_in_box_share(cfg, tmp_path, 8)
    elsewhere = tmp_path / "machines" / "k" / "runs" / d.name
    elsewhere.mkdir(parents=True)
    (elsewhere / figure5.SHARE_FILE).write_text(json.dumps({**stored, "share": [[0.5], [1.0]]}))
    assert figure5.run_in_box_share(cfg, tmp_path, 4, folder=elsewhere).tolist() == [[0.5], [1.0]]
    trained_in = []
    monkeypatch.setattr(figure5, "train", lambda cfg, d, **kw: trained_in.append(Path(d)) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other images, another kind's retrain: this kind's folder
        figure5.run_in_box_share(cfg, tmp_path, 8, folder=elsewhere)
    assert trained_in == [tmp_path / "machines" / machine_slug() / "runs" / d.name]
    (d / figure5.SHARE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="attention_in_box.json"):
        figure5.run_in_box_share(cfg, tmp_path, 4)


@pytest.fixture
def tiny_models(smoke_detector):
    model, cfg = smoke_detector
    return {"baseline": (model, cfg), "ST+SR+SPR": (model, cfg)}


def test_object_rows_follow_one_gt_in_every_layer(tiny_models):
    from sodlib.inference.heatmaps import plot_object_attention

    torch.manual_seed(1)
    image = torch.rand(3, 320, 320)
    gt = torch.tensor([0.5, 0.25, 0.05, 0.04])
    rows = figure5.object_rows(tiny_models, image, gt, tag="val image 0")
    depth = tiny_models["baseline"][1].model.num_decoder_layers
    assert len(rows) == 2 and rows[0]["label"].startswith("baseline · val image 0")
    assert np.allclose(rows[0]["gt_xyxy"], [152, 73.6, 168, 86.4], atol=1e-3)
    assert len(rows[0]["densities"]) == depth and rows[0]["densities"][0].shape == (320, 320)
    assert len(rows[0]["notes"]) == depth and all(n.endswith("% in GT box") for n in rows[0]["notes"])
    assert rows[0]["image_hwc"].shape == (320, 320, 3)
    fig = plot_object_attention(None, rows, list(range(depth)), title="t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == f"layer 1 · {rows[0]['notes'][0]}"
    cyan = [p for ax in fig.axes for p in ax.patches if p.get_edgecolor()[:3] == (0.0, 1.0, 1.0)]
    assert len(cyan) == 2 * depth  # the GT box in every panel


def test_top_query_panels_sum_the_top_queries(tiny_models):
    class Images:
        def __init__(self):
            torch.manual_seed(2)
            self.items = [(torch.rand(3, 320, 320), {"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])})]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

        def image_path(self, i):
            return f"/data/img_{i}.jpg"

    panels = figure5.top_query_panels(tiny_models, Images(), num_images=3, top_queries=4)
    depth = tiny_models["baseline"][1].model.num_decoder_layers
    assert len(panels) == 2 and len(panels[0]) == depth
    assert panels[0][0]["title"] == "baseline, img_0, layer 1"
    assert np.allclose(panels[0][0]["boxes_xyxy"], [[144, 128, 176, 192]])
    # each query's weights sum to 1 per head: the splat holds at most top × heads of mass
    heads = tiny_models["baseline"][0].decoder.layers[0].cross_attn.num_heads
    assert 0 < panels[0][0]["heat"].sum() <= 4 * heads + 1e-4


def test_seed_table_means_over_seeds(tmp_path):
    from sodlib.studies.stats import seed_table

    cfgs = figure5.figure5_configs("smoke", seeds=2)
    entries = [(label, s, c) for label in figure5.MODELS for s, c in enumerate(cfgs[label])]
    metrics = [
        {"AP": ap, "AP50": 2 * ap, "iterations": 8, "train_seconds": 1.0} for ap in (0.1, 0.3, 0.2, 0.6)
    ]
    runs, table = seed_table(entries, metrics, tmp_path, columns=("AP", "AP50"))
    assert list(runs["run"]) == [run_dir(c, tmp_path).name for *_, c in entries]
    assert list(table.columns) == ["model", "seeds", "AP", "AP std", "AP50", "iterations", "runs", "kind"]
    assert table["AP"].tolist() == pytest.approx([0.2, 0.4]) and table["AP50"].tolist() == pytest.approx(
        [0.4, 0.8]
    )
    assert table["AP std"].tolist() == pytest.approx([math.sqrt(0.02), math.sqrt(0.08)])
    _, one = seed_table(entries[::2], metrics[::2], tmp_path, columns=("AP",))
    assert "AP std" not in one.columns and one["seeds"].tolist() == [1, 1]


def test_trained_models_load_weights_and_train_only_what_lacks_them(tmp_path, monkeypatch, smoke_detector):
    from sodlib.checkpoints import save_checkpoint
    from sodlib.studies import runner
    from sodlib.training import engine

    model, _ = smoke_detector
    cfgs = {label: figure5.figure5_configs("smoke", seeds=1)[label][0] for label in figure5.MODELS}
    have = run_dir(cfgs["baseline"], tmp_path) / "checkpoints" / "last.pt"
    save_checkpoint(have, model=model.state_dict(), config=cfgs["baseline"].to_dict())
    calls = []

    def fake_train(cfg, out_dir, data_root=None, progress=True, protocol="coco", need_checkpoint=False):
        calls.append((cfg.loss.spr, need_checkpoint))
        save_checkpoint(
            Path(out_dir) / "checkpoints" / "last.pt", model=model.state_dict(), config=cfg.to_dict()
        )
        return {"AP": 0.0}

    monkeypatch.setattr(engine, "train", fake_train)
    monkeypatch.setattr(runner, "_prepare_data", lambda cfgs, root: None)
    models = runner.trained_models(cfgs, tmp_path, workers=1)
    assert list(models) == ["baseline", "ST+SR+SPR"] and calls == [
        (True, True)
    ]  # only the run without weights
    loaded, cfg = models["ST+SR+SPR"]
    assert cfg == cfgs["ST+SR+SPR"] and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def _train_into(trained_in: list, model, monkeypatch) -> None:
    """Training replaced by saving ``model``'s weights; each folder trained is appended to ``trained_in``."""
    from sodlib.checkpoints import save_checkpoint
    from sodlib.studies import runner
    from sodlib.training import engine

    def fake_train(cfg, out_dir, data_root=None, progress=True, protocol="coco", need_checkpoint=False):
        trained_in.append(Path(out_dir))
        save_checkpoint(
            Path(out_dir) / "checkpoints" / "last.pt", model=model.state_dict(), config=cfg.to_dict()
        )
        return {"AP": 0.0}

    monkeypatch.setattr(engine, "train", fake_train)
    monkeypatch.setattr(runner, "_prepare_data", lambda cfgs, root: None)


def test_trained_models_read_and_train_in_the_folders_given(tmp_path, monkeypatch, smoke_detector):
    from sodlib.studies import runner

    model, _ = smoke_detector
    cfg = figure5.figure5_configs("smoke", seeds=1)["baseline"][0]
    elsewhere = tmp_path / "machines" / machine_slug() / "runs" / run_dir(cfg).name
    trained_in = []
    _train_into(trained_in, model, monkeypatch)
    runner.trained_models({"baseline": cfg}, tmp_path, workers=1, folders={"baseline": elsewhere})
    assert trained_in == [elsewhere] and not run_dir(cfg, tmp_path).exists()


def test_trained_models_never_train_into_another_kinds_retrain(tmp_path, monkeypatch, smoke_detector, capsys):
    """A whole retrain on another kind (machines/<kind>/runs/<run>) without weights is left as it is: this
    machine trains the weights into its own kind's folder, and says where they came from."""
    from sodlib.studies import runner

    model, _ = smoke_detector
    cfg = figure5.figure5_configs("smoke", seeds=1)["baseline"][0]
    name = run_dir(cfg).name
    other = tmp_path / "machines" / "Other_kind" / "runs" / name
    other.mkdir(parents=True)
    (other / "metrics.json").write_text('{"AP": 0.5}')
    trained_in = []
    _train_into(trained_in, model, monkeypatch)
    here = tmp_path / "machines" / machine_slug() / "runs" / name
    assert runner.weights_folder(other, tmp_path) == here
    assert runner.weights_folder(run_dir(cfg, tmp_path), tmp_path) == run_dir(cfg, tmp_path)
    runner.trained_models({"baseline": cfg}, tmp_path, workers=1, folders={"baseline": other})
    assert trained_in == [here] and sorted(p.name for p in other.iterdir()) == ["metrics.json"]
    assert f"baseline: {other} was trained on another kind of machine" in capsys.readouterr().out
    runner.trained_models({"baseline": cfg}, tmp_path, workers=1, folders={"baseline": other})
    assert trained_in == [here]  # the weights of this kind's retrain are reused


def test_seed_table_names_runs_read_from_a_retrain_by_their_path_and_kind(tmp_path, put_run):
    from sodlib.studies.stats import seed_table

    cfgs = figure5.figure5_configs("smoke", seeds=1)
    entries = [(label, 0, cfgs[label][0]) for label in figure5.MODELS]
    metrics = [{"AP": 0.1, "iterations": 8, "train_seconds": 1.0}] * 2
    retrain = tmp_path / "machines" / "k" / "runs" / run_dir(entries[0][2]).name
    put_run(retrain, entries[0][2], "k", 0.1)
    put_run(run_dir(entries[1][2], tmp_path), entries[1][2], "j", 0.1)
    runs, table = seed_table(entries, metrics, tmp_path, ("AP",), folders=[retrain, None])
    assert runs["run"].tolist() == [f"machines/k/runs/{retrain.name}", run_dir(entries[1][2]).name]
    assert runs["kind"].tolist() == ["k", "j"]
    assert table["runs"].tolist() == [retrain.name, run_dir(entries[1][2]).name]  # by config hash
    assert table["kind"].tolist() == ["k", "j"]


def test_ap_differences_pair_the_runs_as_the_shares_are(tmp_path, put_run):
    cfgs = figure5.figure5_configs("smoke", seeds=2)
    aps = {"baseline": (0.40, 0.42), figure5.RETUNE: (0.41, 0.42), "ST+SR+SPR": (0.43, 0.46)}
    folders = {}
    for label, values in aps.items():
        folders[label] = [run_dir(c, tmp_path) for c in cfgs[label]]
        for folder, cfg, ap in zip(folders[label], cfgs[label], values):
            put_run(folder, cfg, "k", ap, APS=ap - 0.1)
    folders["ST+SR+SPR"].append(tmp_path / "runs" / "not-trained")  # a run without metrics is left out
    d = figure5.ap_differences(folders).set_index(["model", "vs", "metric"])
    full = d.loc[("ST+SR+SPR", figure5.RETUNE, "AP")]
    assert full["pairs"] == 2 and full["diff"] == pytest.approx(3.0)  # (2 + 4) / 2 points
    half = 12.7062 * math.sqrt(2.0) / math.sqrt(2)  # sd of (2, 4) is √2, t(1) 12.706
    assert full["ci95_high"] == pytest.approx(3.0 + half, abs=1e-3)
    assert d.loc[("ST+SR+SPR", "baseline", "APS"), "diff"] == pytest.approx(3.5)
    ap = d.xs("AP", level="metric")
    smallest = ap["p"].idxmin()  # Holm's first step: the smallest p times the number of AP comparisons
    assert ap.loc[smallest, "p_holm"] == pytest.approx(3 * ap.loc[smallest, "p"])
    verdict = figure5.ap_verdict(d.reset_index())
    assert verdict.startswith("AP ×100 of the same runs: ST+SR+SPR − baseline +3.50 [")
