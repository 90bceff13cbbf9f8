import pytest

from sodlib.config import RunConfig, get_profile, override


@pytest.mark.parametrize("name", ["smoke", "cpu", "ablation", "paper"])
def test_profiles_build_and_round_trip(name):
    cfg = get_profile(name)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cfg.loss.eta_per_layer) == cfg.model.num_decoder_layers


def test_cpu_is_default_and_paper_matches_paper_a():
    assert get_profile() == get_profile("cpu")
    p = get_profile("paper")
    assert (p.model.backbone, p.data.image_size, p.model.num_queries, p.model.hidden_dim) == (
        "presnet50vd",
        640,
        300,
        256,
    )
    assert (p.model.num_heads, p.model.num_levels, p.model.num_points, p.model.num_denoising) == (
        8,
        3,
        4,
        100,
    )
    assert (p.train.lr, p.train.lr_backbone_mult, p.train.weight_decay) == (2e-4, 0.1, 1e-4)
    assert (p.train.warmup_iters, p.train.ema_decay, p.train.clip_max_norm) == (2000, 0.9999, 0.1)
    assert (p.train.epochs, p.train.batch_size) == (72, 16)


def test_override_parses_types():
    cfg = override(
        get_profile("cpu"),
        "loss.st=true",
        "train.lr=1e-3",
        "loss.eta_per_layer=[2, 1]",
        "model.backbone=resnet18",
        "train.multiscale=(256, 288)",
    )
    assert cfg.loss.st is True
    assert cfg.train.lr == 1e-3
    assert cfg.loss.eta_per_layer == (2.0, 1.0)
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.multiscale == (256, 288)
    # the original is untouched (frozen dataclasses)
    assert get_profile("cpu").loss.st is False


@pytest.mark.parametrize(
    "assignment, key",
    [
        ("loss.foo=1", "loss.foo"),
        ("bogus.lr=1", "bogus.lr"),
        ("loss.beta=1.5", "loss.beta"),
        ("loss.beta=-0.1", "loss.beta"),
        ("loss.theta=-1", "loss.theta"),
        ("loss.eta_per_layer=[1.5, 0.9]", "loss.eta_per_layer"),
        ("loss.eta_per_layer=[1.5, 1.2, 1.0]", "loss.eta_per_layer"),
        ("loss.cls_loss=focal", "loss.cls_loss"),
        ("loss.weight_sr_gen=-1", "loss.weight_sr_gen"),
        ("loss.sr_grad=both", "loss.sr_grad"),
        ("loss.st=yes", "loss.st"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("model.hidden_dim=100", "model.hidden_dim"),
        ("data.num_classes=3", "num_classes"),
        ("model.p2_values=true", "model.p2_values"),  # needs num_levels 4
        ("loss.enc_o2m=-1", "loss.enc_o2m"),
        ("loss.beta=nan", "loss.beta"),  # NaN passes every < / > comparison
        ("train.lr=inf", "train.lr"),
        ("loss.eta_per_layer=[1.5, nan]", "loss.eta_per_layer"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.log_every=0", "train.log_every"),
    ],
)
def test_override_rejects_bad_values_naming_the_key(assignment, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        override(get_profile("cpu"), assignment)


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


def test_cpu_profiles_train_in_float32_and_the_gpu_profile_in_bf16():
    for name in ("smoke", "cpu", "ablation"):
        assert get_profile(name).train.device == "cpu" and get_profile(name).train.amp is False, name
    assert get_profile("paper").train.device == "cuda" and get_profile("paper").train.amp is True
    assert override(get_profile("cpu"), "train.amp=true").train.amp is True  # bf16 autocast stays an option


def test_ablation_profile_is_rt_detr_as_paper_a_used_it():
    from sodlib import build_detector

    cfg = get_profile("ablation")
    assert cfg.model.query_nms == 0 and cfg.model.num_decoder_layers == 3 and cfg.model.num_denoising == 100
    assert cfg.loss.cls_loss == "vfl" and not cfg.train.amp and cfg.model.fp32_geometry
    assert cfg.data.image_size == 320 and cfg.train.max_iters > 0 and cfg.train.threads == 1
    decoder = build_detector(cfg.model).decoder
    assert decoder.query_nms == 0 and len(decoder.layers) == 3  # plain top-K, the stated layer count
    # Table 7's four six-layer schedules stay four distinct three-layer schedules
    from sodlib.studies.tables import ABLATION_TABLES, eta_schedule

    assert len({eta_schedule(r.eta, 3) for r in ABLATION_TABLES[4].rows}) == 4


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.threads=-3", "train.threads"),
        ("train.multiscale=[0]", r"train.multiscale sizes must be positive multiples of 32 .*got \[0\]"),
        ("train.multiscale=[320,300]", r"got \[320, 300\]"),
    ],
)
def test_bad_thread_counts_and_train_sizes_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        override(get_profile("smoke"), item)
