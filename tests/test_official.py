"""Released RT-DETR architectures and checkpoints: ResNet-vd, key layouts, transformers as the oracle."""

import re
import warnings

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from sodlib.build import build_detector
from sodlib.config import ModelConfig
from sodlib.models.backbone import PResNet
from sodlib.models.encoder import sincos_position_embedding_2d
from sodlib.official import (
    convert_state_dict,
    detect_layout,
    load_rtdetr,
    read_state_dict,
    rtdetr_model_config,
    to_layout,
)


def _randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Perturb every float parameter/buffer except the norm statistics (set by :func:`_calibrate`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point() and "running_" not in key:
                t.add_(scale * torch.randn(t.shape, generator=g))


def _calibrate(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's statistics to those of its input on ``images`` (one pass, in order), so that
    random weights give activations of unit scale and the comparison is not dominated by overflowing maps."""

    def pre(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [
        m.register_forward_pre_hook(pre)
        for m in model.modules()
        if isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------- ResNet-vd


@pytest.mark.parametrize("depth,blocks,channels", [(18, 8, (128, 256, 512)), (50, 16, (512, 1024, 2048))])
def test_presnet_structure_and_names(depth, blocks, channels):
    bb = PResNet(
        depth, return_levels=(3, 4, 5), freeze_norm=(depth == 50), freeze_at=0 if depth == 50 else -1
    )
    assert bb.out_channels == channels and bb.out_strides == (8, 16, 32)
    assert sum(len(stage.blocks) for stage in bb.res_layers) == blocks
    keys = set(bb.state_dict())
    # deep stem, projection shortcut in the first block of every stage (even at equal widths: R18's first),
    # variant-d pooled shortcut where the block halves the resolution
    assert {
        "conv1.conv1_1.conv.weight",
        "conv1.conv1_3.norm.running_var",
        "res_layers.0.blocks.0.short.conv.weight",
        "res_layers.1.blocks.0.short.conv.conv.weight",
        "res_layers.3.blocks.0.short.conv.norm.weight",
    } <= keys
    assert not any(k.startswith("res_layers.1.blocks.1.short") for k in keys)
    assert bb.conv1.conv1_1.conv.stride == (2, 2) and bb.conv1.conv1_1.conv.out_channels == 32
    assert isinstance(bb.res_layers[1].blocks[0].short.pool, torch.nn.AvgPool2d)
    if depth == 50:  # stride on the 3×3 conv of the bottleneck
        assert bb.res_layers[1].blocks[0].branch2a.conv.stride == (1, 1)
        assert bb.res_layers[1].blocks[0].branch2b.conv.stride == (2, 2)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
        assert not any(p.requires_grad for p in bb.conv1.parameters())
        assert all(p.requires_grad for p in bb.res_layers.parameters())
    else:
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
        assert all(p.requires_grad for p in bb.parameters())
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (channels[0], 8, 12),
        (channels[1], 4, 6),
        (channels[2], 2, 3),
    ]


def test_presnet_shortcut_pools_before_projecting():
    """A downsampling block's shortcut averages each 2×2 cell, then projects (variant d): with identity
    weights the shortcut of a constant-per-cell image equals that constant, where a strided 1×1 conv would
    read only the top-left pixel."""
    bb = PResNet(18, freeze_norm=False).eval()
    short = bb.res_layers[1].blocks[0].short
    with torch.no_grad():
        short.conv.conv.weight.zero_()
        short.conv.conv.weight[:, :, 0, 0] += torch.eye(128, 64)
        x = torch.zeros(1, 64, 4, 4)
        x[..., 0::2, 0::2] = 4.0  # top-left pixel of every cell
        out = short(x)
    torch.testing.assert_close(out[0, :64], torch.ones(64, 2, 2))  # mean of (4, 0, 0, 0), not 4


def test_presnet_loads_imagenet_weights_in_presnet_layout(tmp_path):
    src = PResNet(34, freeze_norm=False)
    _randomise(src, seed=1)
    path = tmp_path / "ResNet34_vd_pretrained.pth"
    torch.save(src.state_dict(), path)  # with num_batches_tracked, as trainable BatchNorm saves it
    frozen = PResNet(34, freeze_norm=True, pretrained_path=str(path))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(value, src.state_dict()[key], msg=key)
    other = tmp_path / "r18.pth"
    torch.save(PResNet(18).state_dict(), other)
    with pytest.raises(ValueError, match="r18.pth"):
        PResNet(34, pretrained_path=str(other))


def test_presnet_config_choices():
    cfg = ModelConfig(backbone="presnet101vd", num_classes=3)
    with torch.device("meta"):
        model = build_detector(cfg)
    assert isinstance(model.backbone, PResNet) and len(model.backbone.res_layers[2].blocks) == 23
    with pytest.raises(ValueError, match="model.backbone"):
        ModelConfig(backbone="presnet152vd")


# ---------------------------------------------------------------- released architectures


def test_released_architectures_match_the_published_sizes():
    """Parameter counts of RT-DETR's README: R18 20M, R34 31M, R50 42M, R101 76M (ours: 20.18, 31.44, 42.89,
    76.56 M)."""
    published = {18: 20, 34: 31, 50: 42, 101: 76}
    for depth, millions in published.items():
        cfg = rtdetr_model_config(depth)
        with torch.device("meta"):
            model = build_detector(cfg)
        assert int(sum(p.numel() for p in model.parameters()) / 1e6) == millions, depth  # README truncates
    r18, r101 = rtdetr_model_config(18), rtdetr_model_config(101, num_classes=2)
    assert (r18.num_decoder_layers, r18.expansion, r18.freeze_norm, r18.freeze_at) == (3, 0.5, False, -1)
    assert (r101.encoder_dim, r101.encoder_ffn, r101.hidden_dim, r101.num_classes) == (384, 2048, 256, 2)
    assert rtdetr_model_config(34).num_decoder_layers == 4 and rtdetr_model_config(50).freeze_at == 0
    with pytest.raises(ValueError, match="depths"):
        rtdetr_model_config(152)


def test_rtdetr_position_embedding_layout():
    """RT-DETR builds its grid as meshgrid(arange(w), arange(h), 'ij') and flattens it: token t gets
    (t // h, t % h). Hand-computed for a 2×3 map (h=2, w=3) with dim 4 (ω = 1): tokens 0..5 → a = 0,0,1,1,2,2
    and b = 0,1,0,1,0,1 — not the (x, y) of token t = y·3 + x."""
    emb = sincos_position_embedding_2d(2, 3, 4, layout="rtdetr")[0]
    a = torch.tensor([0.0, 0, 1, 1, 2, 2])
    b = torch.tensor([0.0, 1, 0, 1, 0, 1])
    torch.testing.assert_close(emb, torch.stack([a.sin(), a.cos(), b.sin(), b.cos()], 1))
    xy = sincos_position_embedding_2d(2, 3, 4)[0]
    x, y = torch.tensor([0.0, 1, 2, 0, 1, 2]), torch.tensor([0.0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(xy, torch.stack([x.sin(), x.cos(), y.sin(), y.cos()], 1))
    # on a square map the released layout is (y, x): xy with its halves swapped
    sq, sq_xy = (
        sincos_position_embedding_2d(5, 5, 64, layout="rtdetr"),
        sincos_position_embedding_2d(5, 5, 64),
    )
    torch.testing.assert_close(sq, torch.cat([sq_xy[..., 32:], sq_xy[..., :32]], -1))
    with pytest.raises(ValueError, match="layout"):
        sincos_position_embedding_2d(2, 2, 4, layout="yx")


# ---------------------------------------------------------------- layouts and loading


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("layout", ["official", "hf"])
def test_layout_round_trip_every_depth(depth, layout):
    """Our weights written in the other layout load back into an equal detector (every tensor, the
    outputs)."""
    cfg = rtdetr_model_config(depth, num_classes=3)
    torch.manual_seed(depth)
    model = build_detector(cfg)
    _randomise(model, seed=depth)
    theirs = to_layout(model, layout)
    assert detect_layout(theirs) == layout
    renamed = set(model.state_dict()) - set(theirs)
    assert any(k.startswith("decoder.layers.") for k in renamed) and any(".blocks." in k for k in renamed)
    loaded = load_rtdetr(theirs, cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if depth in (18, 50):
        images = torch.rand(1, 3, 96, 96)
        with torch.no_grad():
            a, b = model.eval()(images), loaded(images)
        assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(
            a["pred_boxes"], b["pred_boxes"]
        )


def test_official_names_follow_rtdetr_code():
    """A few names as RT-DETR's own modules register them (rtdetr_pytorch/src/zoo/rtdetr)."""
    names = set(to_layout(build_detector(rtdetr_model_config(18, num_classes=2)), "official"))
    assert {
        "encoder.encoder.0.layers.0.linear1.weight",
        "encoder.encoder.0.layers.0.self_attn.in_proj_weight",
        "encoder.fpn_blocks.0.bottlenecks.2.conv1.conv.weight",
        "encoder.fpn_blocks.0.conv3.norm.running_var",
        "encoder.lateral_convs.1.conv.weight",
        "encoder.pan_blocks.1.conv2.norm.bias",
        "decoder.input_proj.2.conv.weight",
        "decoder.input_proj.0.norm.running_mean",
        "decoder.decoder.layers.2.cross_attn.sampling_offsets.weight",
        "decoder.dec_bbox_head.2.layers.2.bias",
        "decoder.enc_output.1.weight",
        "decoder.denoising_class_embed.weight",
        "backbone.res_layers.0.blocks.0.short.conv.weight",
    } <= names
    assert not any(
        re.search(r"\.ffn\.|\.blocks\.\d+\.conv3|^decoder\.layers", n)
        for n in names
        if not n.startswith("backbone.")
    )


def test_release_formats_and_files(tmp_path):
    cfg = rtdetr_model_config(18, num_classes=2)
    model = build_detector(cfg)
    _randomise(model, seed=3)
    official = to_layout(model, "official")
    ref = model.state_dict()["decoder.dec_score_head.2.weight"]
    formats = {
        "ema": {"ema": {"module": official, "updates": 10}, "model": {}, "last_epoch": 71},
        "model": {"model": official},
        "bare": official,
        "ddp": {"model": {f"module.{k}": v for k, v in official.items()}},
    }
    for name, obj in formats.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        loaded = load_rtdetr(path, cfg)
        assert torch.equal(loaded.decoder.dec_score_head[2].weight, ref), name
        assert not loaded.training
    from safetensors.torch import save_file

    folder = tmp_path / "hf_folder"
    folder.mkdir()
    save_file(to_layout(model, "hf"), str(folder / "model.safetensors"))
    assert torch.equal(load_rtdetr(folder, cfg).decoder.dec_score_head[2].weight, ref)
    # sodlib's own checkpoint layout loads through the same door
    sodlib_ckpt = tmp_path / "sodlib.pt"
    torch.save({"version": 1, "model": model.state_dict(), "config": {}}, sodlib_ckpt)
    assert torch.equal(load_rtdetr(sodlib_ckpt, cfg).decoder.dec_score_head[2].weight, ref)


def test_bad_checkpoints_are_refused_with_the_keys_at_fault(tmp_path):
    cfg = rtdetr_model_config(18, num_classes=2)
    official = to_layout(build_detector(cfg), "official")
    dropped = dict(official)
    del dropped["decoder.decoder.layers.1.linear2.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.decoder\.layers\.1\.linear2\.weight"):
        load_rtdetr(dropped, cfg)
    extra = {**official, "decoder.mystery.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder\.mystery\.weight"):
        load_rtdetr(extra, cfg)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in official.items()}
    with pytest.raises(ValueError, match=r"state dict: weight '[\w.]+' holds NaN or infinite values"):
        load_rtdetr(nan, cfg)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch .*decoder\.enc_score_head\.weight: \(2, 256\) in the "
        r"checkpoint, \(80, 256\) in the model",
    ):
        load_rtdetr(official, rtdetr_model_config(18))
    with pytest.raises(
        ValueError, match=r"missing \(\d+\): backbone\.res_layers\.0\.blocks\.2\."
    ):  # R18 weights, R34 config
        load_rtdetr(official, rtdetr_model_config(34, num_classes=2))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_rtdetr(junk, cfg)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_rtdetr(tmp_path / "nothing.pth", cfg)
    with pytest.raises(ValueError, match="holds no model state dict"):
        read_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="cannot tell the layout"):
        convert_state_dict({"weight": torch.zeros(1)}, build_detector(cfg))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_rtdetr(empty, cfg)


# ---------------------------------------------------------------- transformers as the oracle


def _hf_model(depth: int, num_labels: int):
    transformers = pytest.importorskip("transformers")
    if depth == 18:
        backbone = transformers.RTDetrResNetConfig(
            depths=[2, 2, 2, 2],
            layer_type="basic",
            hidden_sizes=[64, 128, 256, 512],
            out_features=["stage2", "stage3", "stage4"],
        )
        config = transformers.RTDetrConfig(
            backbone_config=backbone,
            encoder_in_channels=[128, 256, 512],
            hidden_expansion=0.5,
            decoder_layers=3,
            num_labels=num_labels,
        )
    else:
        config = transformers.RTDetrConfig(num_labels=num_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.RTDetrForObjectDetection(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_transformers_rtdetr_weights_give_equal_outputs(depth):
    """transformers' RT-DETR with random weights → its state dict into sodlib → equal eval outputs."""
    torch.manual_seed(depth)
    hf = _hf_model(depth, num_labels=4)
    _randomise(hf, seed=depth)
    images = torch.rand(2, 3, 160, 160)  # square: transformers' and RT-DETR's embedding layouts agree
    _calibrate(hf, images)
    ours = load_rtdetr(hf.state_dict(), rtdetr_model_config(depth, num_classes=4))
    with torch.no_grad():
        expected = hf(pixel_values=images)
        got = ours(images)
    assert expected.logits.std() > 0.3  # the outputs compared are not a constant
    torch.testing.assert_close(got["pred_logits"], expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-4, atol=1e-4)
    # the same weights under transformers 4.x names (out_proj, fc1/fc2, encoder.encoder) load too
    v4 = {
        re.sub(
            r"\.mlp\.fc",
            ".fc",
            k.replace(".o_proj.", ".out_proj.").replace("encoder.aifi.", "encoder.encoder."),
        ): v
        for k, v in hf.state_dict().items()
    }
    assert "model.encoder.encoder.0.layers.0.fc1.weight" in v4
    old = load_rtdetr(v4, rtdetr_model_config(depth, num_classes=4))
    with torch.no_grad():
        assert torch.equal(old(images)["pred_logits"], got["pred_logits"])


def test_paper_profile_is_the_released_r50():
    from sodlib.config import get_profile

    assert get_profile("paper").model == rtdetr_model_config(50, num_classes=10)


# ---------------------------------------------------------------- fine-tuning


def test_init_from_loads_what_fits_and_reinitialises_the_class_heads():
    from sodlib.official import init_from

    coco = build_detector(rtdetr_model_config(18, num_classes=80))
    _randomise(coco, seed=5)
    model = build_detector(rtdetr_model_config(18, num_classes=3))
    fresh_head = model.decoder.dec_score_head[0].weight.clone()
    report = init_from(model, to_layout(coco, "official"))
    heads = {
        f"decoder.{h}.{p}"
        for h in ("enc_score_head", *(f"dec_score_head.{i}" for i in range(3)))
        for p in ("weight", "bias")
    } | {"decoder.denoising_class_embed.weight"}
    assert set(report.reinitialised) == heads and report.absent == [] and report.layout == "official"
    assert "re-initialised, shape differs: 9" in str(report)
    assert torch.equal(
        model.backbone.res_layers[3].blocks[1].branch2b.conv.weight,
        coco.backbone.res_layers[3].blocks[1].branch2b.conv.weight,
    )
    assert torch.equal(
        model.decoder.layers[2].cross_attn.sampling_offsets.bias,
        coco.decoder.layers[2].cross_attn.sampling_offsets.bias,
    )
    assert torch.equal(model.decoder.dec_score_head[0].weight, fresh_head)
    with pytest.raises(ValueError, match="not a checkpoint of this architecture"):
        init_from(
            build_detector(
                ModelConfig(
                    backbone="tiny",
                    hidden_dim=32,
                    num_heads=4,
                    dim_feedforward=64,
                    encoder_ffn=64,
                    num_decoder_layers=1,
                )
            ),
            to_layout(coco, "official"),
        )


@pytest.mark.slow
def test_cli_train_init_from_another_class_count(tmp_path, capsys):
    import json

    from sodlib.cli import main
    from sodlib.config import get_profile, override

    donor_cfg = override(get_profile("smoke"), "model.num_classes=2", "data.num_classes=2").model
    donor = build_detector(donor_cfg)
    _randomise(donor, seed=7)
    ckpt = tmp_path / "donor.pth"
    torch.save({"ema": {"module": to_layout(donor, "official")}}, ckpt)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--profile",
                "smoke",
                "--init-from",
                str(ckpt),
                "--out",
                str(out),
                "--data",
                str(tmp_path / "data"),
                "--set",
                "train.max_iters=1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"initialised from {ckpt} (official layout)" in printed
    assert "decoder.enc_score_head.weight" in printed
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(ckpt)
    assert (
        main(
            [
                "train",
                "--profile",
                "smoke",
                "--init-from",
                str(tmp_path / "absent.pth"),
                "--out",
                str(tmp_path / "run2"),
                "--data",
                str(tmp_path / "data"),
            ]
        )
        == 2
    )
