"""Typed run configuration: data, model, loss and training settings, named profiles, overrides.

A run is fully described by a :class:`RunConfig`. Profiles (``smoke``, ``cpu``, ``paper``) are
functions returning one; ``override(cfg, "loss.st=true", ...)`` returns a modified copy and
rejects unknown keys, ill-typed and out-of-range values with a ``ValueError`` naming the key.
Configs are frozen dataclasses, so they hash and compare by value and can be embedded in
checkpoints (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthsod"  # synthsod | coco | visdrone | voc
    root: str = ""  # dataset folder; "" = SynthSOD in the data cache (generated on demand)
    # coco: image file_names may point outside images/<split> (../, absolute)
    allow_outside_paths: bool = False
    image_size: int = 320  # square working size in pixels (images are resized to it)
    num_classes: int = 6  # foreground classes
    synth_train_images: int = 512  # SynthSOD train split size
    synth_val_images: int = 128  # SynthSOD val split size
    synth_seed: int = 0  # SynthSOD base seed (val uses a derived seed, see synth.py)
    train_split: str = "train"  # sub-folder / annotation name of the training split
    val_split: str = "val"  # sub-folder / annotation name of the evaluation split
    augment: str = "rtdetr"  # rtdetr (photometric, zoom-out, IoU crop, flip) | flip | none
    num_workers: int = 0  # DataLoader workers (0 = main process; best on 2 cores)

    def __post_init__(self):
        _check_choice("data.dataset", self.dataset, ("synthsod", "coco", "visdrone", "voc"))
        _check_choice("data.augment", self.augment, ("rtdetr", "flip", "none"))
        _check_range("data.image_size", self.image_size, lo=32)
        _check_range("data.num_classes", self.num_classes, lo=1)
        _check_range("data.synth_train_images", self.synth_train_images, lo=1)
        _check_range("data.synth_val_images", self.synth_val_images, lo=1)
        _check_range("data.num_workers", self.num_workers, lo=0)


BACKBONES = (
    "tiny",
    "resnet18",
    "resnet34",
    "resnet50",
    "presnet18vd",
    "presnet34vd",
    "presnet50vd",
    "presnet101vd",
)


@dataclass(frozen=True)
class ModelConfig:
    # tiny | resnet18/34/50 (torchvision) | presnet18vd/34vd/50vd/101vd (RT-DETR's ResNet-vd)
    backbone: str = "resnet18"
    backbone_width: int = 32  # stem width of the `tiny` backbone (ignored by ResNets)
    # local backbone state_dict (torchvision layout for resnetNN, PResNet's for presnetNNvd)
    pretrained_path: str = ""
    freeze_norm: bool = True  # FrozenBatchNorm2d in the backbone (RT-DETR practice)
    freeze_at: int = -1  # ResNet: -1 trains all; 0 freezes the stem (RT-DETR-R50); k also stages 1..k
    num_classes: int = 6  # foreground classes (must equal data.num_classes)
    hidden_dim: int = 256  # transformer width C
    num_heads: int = 8  # attention heads
    # feature levels fed to the decoder (strides 8, 16, 32; must be 4 = strides 4..32 with bifpn_sae)
    num_levels: int = 3
    num_points: int = 4  # sampling points per head and level
    # hybrid: a stride-4 level (C2 + upsampled P3; num_levels 4) sampled, never selected
    p2_values: bool = False
    num_queries: int = 300  # object queries (top-K encoder tokens)
    num_decoder_layers: int = 6  # decoder layers (one box/class head each)
    dim_feedforward: int = 1024  # decoder FFN width
    encoder_ffn: int = 1024  # AIFI FFN width
    encoder_dim: int = 0  # hybrid encoder width (0 = hidden_dim; RT-DETR-R101: 384, projected to hidden_dim)
    # AIFI's sin-cos layout: xy (x then y) | rtdetr (the released code's; see encoder.py)
    pos_embed: str = "xy"
    csp_blocks: int = 3  # RepVGG blocks per CSP stage in CCFM
    expansion: float = 1.0  # CSP hidden-width expansion
    dropout: float = 0.0
    num_denoising: int = 100  # total denoising queries (0 disables contrastive denoising)
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    # IoU of class-agnostic NMS over the encoder proposals before top-K (0 = RT-DETR's plain top-K)
    query_nms: float = 0.0
    # boxes, reference points, sampling locations and weights in float32 under autocast
    fp32_geometry: bool = False
    # diagnostic: the same rounded to bfloat16 precision (what autocast does), in float32
    bf16_geometry: bool = False
    # IoU of a per-class NMS in post-processing (0 = end-to-end, RT-DETR's own post-processor)
    post_nms: float = 0.0
    encoder: str = "hybrid"  # hybrid (RT-DETR AIFI+CCFM) | bifpn_sae (MRQM)
    bifpn_repeats: int = 2  # MRQM: BiFPN layers
    sae_high_updates: int = 2  # MRQM: SAE updates of the high-level tokens F3..F5
    iah: bool = False  # MRQM: IoU-aware auxiliary head + auxiliary positive queries (training only)
    iah_tb: float = 0.55  # MRQM: base IoU threshold T_b of T_I = max(T_b, T_b + k·(sqrt(w·h)/A_s)^p)
    iah_k: float = 0.15  # MRQM: k of T_I (negative k makes max(T_b, ·) clamp to T_b)
    iah_p: float = 0.2  # MRQM: exponent p of T_I
    # MRQM: A_s as a LENGTH in pixels (sqrt of the smallest gt area); 0 = auto (engine)
    iah_as_px: float = 0.0
    iah_reading: str = "norm_px2"  # MRQM: units of sqrt(w·h)/A_s in T_I (sodlib.models.iou_head.READINGS)
    iah_max_queries: int = 300  # MRQM: cap on auxiliary positive queries per image (kept by IAH score)

    def __post_init__(self):
        _check_choice("model.backbone", self.backbone, BACKBONES)
        _check_choice("model.pos_embed", self.pos_embed, ("xy", "rtdetr"))
        _check_choice("model.encoder", self.encoder, ("hybrid", "bifpn_sae"))
        _check_choice("model.iah_reading", self.iah_reading, ("norm_px2", "px_px2", "px_px"))
        for key in (
            "num_classes",
            "hidden_dim",
            "num_heads",
            "num_levels",
            "num_points",
            "num_queries",
            "num_decoder_layers",
            "dim_feedforward",
            "encoder_ffn",
            "backbone_width",
        ):
            _check_range(f"model.{key}", getattr(self, key), lo=1)
        _check_range("model.num_denoising", self.num_denoising, lo=0)
        _check_range("model.encoder_dim", self.encoder_dim, lo=0)
        _check_range("model.freeze_at", self.freeze_at, lo=-1, hi=4)
        _check_range("model.dropout", self.dropout, lo=0.0, hi=1.0)
        _check_range("model.label_noise_ratio", self.label_noise_ratio, lo=0.0, hi=1.0)
        _check_range("model.box_noise_scale", self.box_noise_scale, lo=0.0)
        _check_range("model.query_nms", self.query_nms, lo=0.0, hi=1.0)
        _check_range("model.post_nms", self.post_nms, lo=0.0, hi=1.0)
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"model.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        width, key = (
            (self.encoder_dim, "model.encoder_dim")
            if self.encoder_dim
            else (self.hidden_dim, "model.hidden_dim")
        )
        if self.encoder == "hybrid" and (width % self.num_heads or width % 4):
            raise ValueError(
                f"{key} ({width}) must be divisible by model.num_heads ({self.num_heads}) and by 4 "
                f"(the hybrid encoder's 2-D sin-cos position embedding)"
            )
        if self.encoder_dim and self.encoder != "hybrid":
            raise ValueError(
                f"model.encoder_dim applies to model.encoder='hybrid' only, got {self.encoder!r}"
            )
        if self.encoder == "bifpn_sae" and self.num_levels != 4:
            raise ValueError(
                f"model.num_levels must be 4 with model.encoder='bifpn_sae' (P2..P5), got {self.num_levels}"
            )
        if self.p2_values and (self.encoder != "hybrid" or self.num_levels != 4):
            raise ValueError(
                f"model.p2_values needs model.encoder='hybrid' and model.num_levels=4 (strides 4..32), "
                f"got {self.encoder!r} and {self.num_levels}"
            )
        if self.encoder == "bifpn_sae" and self.hidden_dim % 4:
            raise ValueError(
                f"model.hidden_dim ({self.hidden_dim}) must be divisible by 4 with "
                f"model.encoder='bifpn_sae' (2-D sin-cos position embedding)"
            )
        if self.iah and self.hidden_dim % 8:
            raise ValueError(
                f"model.hidden_dim ({self.hidden_dim}) must be divisible by 8 with model.iah "
                f"(sine embedding of the 4 box coordinates)"
            )
        _check_range("model.bifpn_repeats", self.bifpn_repeats, lo=1)
        _check_range("model.sae_high_updates", self.sae_high_updates, lo=1)
        _check_range("model.iah_tb", self.iah_tb, lo=0.0, hi=1.0)
        _check_range("model.iah_k", self.iah_k, lo=-1.0, hi=1.0)
        _check_range("model.iah_p", self.iah_p, lo=0.0)
        _check_range("model.iah_as_px", self.iah_as_px, lo=0.0)
        _check_range("model.iah_max_queries", self.iah_max_queries, lo=1)


@dataclass(frozen=True)
class LossConfig:
    # RT-DETR baseline terms and Hungarian costs
    weight_vfl: float = 1.0
    weight_bbox: float = 5.0  # L1 on normalised cxcywh
    weight_giou: float = 2.0
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_alpha: float = 0.25  # focal class cost of the Hungarian matcher: positive-term scale (RT-DETR)
    cost_gamma: float = 2.0  # focal class cost of the Hungarian matcher: focusing exponent (RT-DETR)
    alpha: float = 0.75  # negative-term scale of the classification loss (Eq. 3)
    gamma: float = 2.0  # negative-term focusing exponent (Eq. 3)
    cls_loss: str = "vfl"  # vfl | qfl (GFL) | tal (TOOD)
    tal_a: float = 1.0  # cls_loss=tal: exponent of the score s in TOOD's alignment t = s^a * u^b
    tal_b: float = 6.0  # cls_loss=tal: exponent of the IoU u in TOOD's alignment t = s^a * u^b
    # k of a one-to-many (gt repeated k times) Hungarian loss on every encoder token; 0 = off
    enc_o2m: int = 0
    # Paper A (Better Sampling) switches and hyper-parameters
    st: bool = False  # Scale-aligned Target, Eqs. 7-15
    # label | pred: s in ST's target t = c*s (Eq. 15) is the class target (label: t = c at the matched
    # class, VFL's target with c for the IoU) or the detached predicted score (pred: the literal reading,
    # whose BCE fixed point is s = 0)
    st_mode: str = "label"
    beta: float = 0.73  # Eq. 14
    theta: float = 6.0  # Eq. 13
    sr: bool = False  # Sample Reweighting, Eqs. 16-21
    # difficulty (default): r detached, the generator fits the difficulty 1 - t with its own BCE, so hard
    # positives get more weight (paper A, §4.3); end_to_end: r in the graph, whose gradient favours the easy
    # positives (an option and an extra row of Table 3). Either way mean r = mean of the weight it replaces.
    sr_grad: str = "difficulty"  # difficulty | end_to_end
    weight_sr_gen: float = 1.0  # sr_grad=difficulty: weight of the SR generator's own BCE (trains only it)
    spr: bool = False  # Sample Points Refinement, Eq. 5 + L_atten
    eta_per_layer: tuple[float, ...] = (1.5, 1.3, 1.2, 1.1, 1.05, 1.0)
    weight_offset: float = 1.0  # L_offset weight (the paper gives none)
    weight_atten: float = 1.0  # L_atten weight (the paper gives none)
    spr_denoising: bool = False  # whether denoising queries take part in SPR
    # Paper B (MRQM) IoU-aware head terms (used when model.iah; the head is trained on its own positives)
    weight_iah_cls: float = 1.0  # loss_iah_cls: VFL|QFL|TAL (loss.cls_loss) of the IAH over all tokens
    weight_iah_bbox: float = 5.0  # loss_iah_bbox: L1 of the IAH boxes of the positives
    weight_iah_giou: float = 2.0  # loss_iah_giou: 1 - GIoU of the IAH boxes of the positives
    weight_auxq: float = 1.0  # factor on every decoder term of the auxiliary positive queries (Eq. 10)
    # Factor on the three IAH terms, balanced by measurement
    # (sodlib.studies.mrqm_analysis.encoder_gradient_share, notebook 06): at factor 1 the IAH's dense loss
    # sends the encoder 1.0x (hybrid) to 1.6x (BiFPN/SAE) the gradient of all the decoder's terms together
    # at initialisation (ablation profile); 0.25 brings it to a quarter to 0.4x, beside the auxiliary
    # queries' decoder terms.
    weight_iah: float = 0.25

    def __post_init__(self):
        _check_choice("loss.cls_loss", self.cls_loss, ("vfl", "qfl", "tal"))
        _check_choice("loss.st_mode", self.st_mode, ("label", "pred"))
        _check_choice("loss.sr_grad", self.sr_grad, ("difficulty", "end_to_end"))
        _check_range("loss.beta", self.beta, lo=0.0, hi=1.0)
        _check_range("loss.theta", self.theta, lo=0.0)
        _check_range("loss.alpha", self.alpha, lo=0.0)
        _check_range("loss.gamma", self.gamma, lo=0.0)
        _check_range("loss.cost_alpha", self.cost_alpha, lo=0.0, hi=1.0)
        _check_range("loss.cost_gamma", self.cost_gamma, lo=0.0)
        _check_range("loss.tal_a", self.tal_a, lo=0.0)
        _check_range("loss.tal_b", self.tal_b, lo=0.0)
        _check_range("loss.enc_o2m", self.enc_o2m, lo=0)
        if self.cost_class == self.cost_bbox == self.cost_giou == 0:
            raise ValueError("loss.cost_class, loss.cost_bbox and loss.cost_giou cannot all be 0")
        if not self.eta_per_layer:
            raise ValueError("loss.eta_per_layer must hold one value per decoder layer")
        for eta in self.eta_per_layer:
            _check_range("loss.eta_per_layer", eta, lo=1.0)
        for key in (
            "weight_vfl",
            "weight_bbox",
            "weight_giou",
            "cost_class",
            "cost_bbox",
            "cost_giou",
            "weight_offset",
            "weight_atten",
            "weight_sr_gen",
            "weight_iah_cls",
            "weight_iah_bbox",
            "weight_iah_giou",
            "weight_auxq",
            "weight_iah",
        ):
            _check_range(f"loss.{key}", getattr(self, key), lo=0.0)


@dataclass(frozen=True)
class TrainConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    seed: int = 0
    batch_size: int = 4
    epochs: int = 72  # upper bound; max_iters / time_budget_s may stop earlier
    max_iters: int = 0  # 0 = no iteration limit
    time_budget_s: float = 0.0  # wall-clock training budget in seconds; 0 = none
    lr: float = 2e-4
    lr_backbone_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_iters: int = 2000
    lr_schedule: str = "constant"  # constant (RT-DETR) | cosine (decays to 10% at the last iteration)
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_warmups: int = 2000
    clip_max_norm: float = 0.1  # 0 disables gradient clipping
    amp: bool = False  # bf16 autocast of the forward pass: CUDA, or CPUs with bf16 units (emulated elsewhere)
    channels_last: bool = False  # NHWC memory format for the convolutions (faster with oneDNN / cuDNN)
    multiscale: tuple[int, ...] = ()  # train sizes sampled per batch; () = data.image_size only
    eval_every: int = 0  # iterations between evaluations; 0 = only at the end
    checkpoint_every: int = 200  # iterations between checkpoints
    log_every: int = 10
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    init_from: str = ""  # checkpoint (RT-DETR, transformers or sodlib) whose fitting tensors start the model
    # TensorBoard event files in <run>/tensorboard (log.csv stays the source of truth)
    tensorboard: bool = True

    def __post_init__(self):
        _check_range("train.batch_size", self.batch_size, lo=1)
        _check_range("train.epochs", self.epochs, lo=1)
        _check_range("train.max_iters", self.max_iters, lo=0)
        _check_range("train.time_budget_s", self.time_budget_s, lo=0.0)
        _check_range("train.lr", self.lr, lo=0.0)
        _check_range("train.ema_decay", self.ema_decay, lo=0.0, hi=1.0)
        _check_range("train.clip_max_norm", self.clip_max_norm, lo=0.0)
        _check_range("train.warmup_iters", self.warmup_iters, lo=0)
        _check_range("train.checkpoint_every", self.checkpoint_every, lo=1)
        _check_range("train.log_every", self.log_every, lo=1)
        _check_range("train.eval_every", self.eval_every, lo=0)
        _check_range("train.weight_decay", self.weight_decay, lo=0.0)
        _check_range("train.lr_backbone_mult", self.lr_backbone_mult, lo=0.0)
        _check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_range("train.threads", self.threads, lo=0)
        if any(size < 32 or size % 32 for size in self.multiscale):
            raise ValueError(
                f"train.multiscale sizes must be positive multiples of 32 (the coarsest stride), "
                f"got {list(self.multiscale)}"
            )


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        for section in ("data", "model", "loss", "train"):  # NaN and inf pass every `<`/`>` range check
            for f in fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                for v in value if isinstance(value, tuple) else (value,):
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ValueError(f"{section}.{f.name} must be finite, got {value!r}")
        if self.model.num_classes != self.data.num_classes:
            raise ValueError(
                f"model.num_classes ({self.model.num_classes}) must equal "
                f"data.num_classes ({self.data.num_classes})"
            )
        if len(self.loss.eta_per_layer) != self.model.num_decoder_layers:
            raise ValueError(
                f"loss.eta_per_layer has {len(self.loss.eta_per_layer)} values but "
                f"model.num_decoder_layers is {self.model.num_decoder_layers}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _from_dict(cls, d, prefix="")

    def canonical(self) -> RunConfig:
        """This config with the options that cannot act reset to their defaults: SR's generator mode and
        weight (``loss.sr_grad``, ``loss.weight_sr_gen``) while ``loss.sr`` is off. A run's identity (its
        hash, its cached folder) is that of its canonical config, so a change of an inert option's default
        does not orphan the runs it never touched."""
        if self.loss.sr:
            return self
        default = LossConfig()
        return dataclasses.replace(
            self,
            loss=dataclasses.replace(self.loss, sr_grad=default.sr_grad, weight_sr_gen=default.weight_sr_gen),
        )


# ---------------------------------------------------------------- profiles


def _smoke() -> RunConfig:
    return RunConfig(
        name="smoke",
        data=DataConfig(image_size=128, synth_train_images=16, synth_val_images=8, augment="none"),
        model=ModelConfig(
            backbone="tiny",
            backbone_width=16,
            hidden_dim=32,
            num_heads=4,
            num_queries=30,
            num_decoder_layers=2,
            dim_feedforward=64,
            encoder_ffn=64,
            csp_blocks=1,
            num_denoising=20,
        ),
        loss=LossConfig(eta_per_layer=(1.5, 1.0)),
        train=TrainConfig(
            batch_size=2,
            epochs=1,
            max_iters=8,
            lr=1e-3,
            warmup_iters=2,
            ema_decay=0.0,
            checkpoint_every=4,
            log_every=2,
        ),
    )


def _cpu() -> RunConfig:
    # Tiny RT-DETR trained from scratch on SynthSOD: 520 iterations on 2 threads in float32, 0.60 s per step
    # on 2 cores of an AVX2 CPU. Iterations, not wall time, bound the run, so that it is reproducible.
    # bf16 autocast (train.amp=true) pays only on CPUs with bf16 units (avx512_bf16, amx_bf16;
    # sodlib.hardware.cpu_has_native_bf16): 174-197 s of training on 2 AVX512-BF16 cores; emulated, on the
    # AVX2 CPU, it takes 6.4 s per step (train() warns).
    # The short-schedule choices, each measured under bf16 autocast on 2 AVX512-BF16 cores
    # (results/tables/baseline_budget):
    # - flip-only augmentation: zoom-out shrinks 6-px objects below what the stride-8 map resolves;
    # - lr 1.6e-3 with cosine decay: from scratch, RT-DETR's 2e-4 fine-tuning rate is far too low;
    # - batch 4: batch 2 makes more steps but reaches a lower AP in the same time;
    # - 200 queries among encoder proposals made distinct by class-agnostic NMS at IoU 0.5 (DDQ-DETR's
    #   distinct queries): with plain top-K most of RT-DETR's 100 queries sit on duplicates of the same
    #   objects (AP50 0.46 with plain top-K, 0.70 with NMS);
    # - no EMA: the raw weights at the end of the cosine schedule beat a 0.999 EMA by 0.01-0.04 AP50;
    # - 50 denoising queries: 7% cheaper per step than 100, at equal AP50;
    # - 2 decoder layers, the largest part of the step: at equal wall time 540 iterations with 2 layers beat
    #   440 with 3 (AP50 0.731 / 0.748 vs 0.692 / 0.704 on seeds 0 / 1); 1 layer (677 iterations) reaches
    #   0.752 AP50 but AP 0.423 vs 0.446, and leaves no iterative refinement for SPR to act on.
    return RunConfig(
        name="cpu",
        data=DataConfig(image_size=320, augment="flip"),
        model=ModelConfig(
            backbone="tiny",
            backbone_width=32,
            hidden_dim=128,
            num_heads=8,
            num_queries=200,
            query_nms=0.5,
            num_decoder_layers=2,
            dim_feedforward=512,
            encoder_ffn=512,
            csp_blocks=1,
            num_denoising=50,
        ),
        loss=LossConfig(eta_per_layer=(1.5, 1.0)),
        train=TrainConfig(
            batch_size=4,
            epochs=200,
            max_iters=520,
            lr=1.6e-3,
            lr_backbone_mult=1.0,
            warmup_iters=50,
            lr_schedule="cosine",
            ema_decay=0.0,
            clip_max_norm=0.1,
            amp=False,
            eval_every=130,
            checkpoint_every=130,
            threads=2,
        ),
    )


def _ablation() -> RunConfig:
    # RT-DETR as paper A used it, at CPU size: every row of Tables 3-8 is overrides on this profile.
    # RT-DETR's own choices: plain top-K query selection (no query NMS), 300 queries, 100 denoising
    # queries, VFL; 3 decoder layers, the fewest for which Table 7's per-layer eta schedules still differ
    # (the six-layer schedules map to (first, third, last) values: four distinct rows). Everything in
    # float32 (amp off): boxes, reference points, sampling locations, matching and losses; fp32_geometry
    # keeps the geometry in float32 even if amp is switched on (e.g. on a GPU).
    # CPU size: tiny backbone width 16, hidden 64 (8 heads) - measured 0.64 s per single-thread step at
    # batch 4 against 1.3-1.5 s for the cpu profile's width 32 / hidden 128 in fp32 on 2 cores of an x86_64
    # CPU with avx2 and no avx512 (where bf16 autocast is emulated, 8x slower). One thread per run: two runs
    # side by side.
    # Schedule as the cpu profile (lr 1.6e-3 cosine, batch 4, flip, no EMA), a full cosine schedule at a fixed
    # budget (ABLATION_ITERS); results/tables/budget_trend shows how the main effect moves at 2000 and 4000.
    return RunConfig(
        name="ablation",
        data=DataConfig(image_size=320, augment="flip"),
        model=ModelConfig(
            backbone="tiny",
            backbone_width=16,
            hidden_dim=64,
            num_heads=8,
            num_queries=300,
            num_decoder_layers=3,
            dim_feedforward=256,
            encoder_ffn=256,
            csp_blocks=1,
            num_denoising=100,
            fp32_geometry=True,
        ),
        loss=LossConfig(eta_per_layer=(1.5, 1.2, 1.0)),
        train=TrainConfig(
            batch_size=4,
            epochs=1000,
            max_iters=ABLATION_ITERS,
            lr=1.6e-3,
            lr_backbone_mult=1.0,
            warmup_iters=50,
            lr_schedule="cosine",
            ema_decay=0.0,
            clip_max_norm=0.1,
            amp=False,
            eval_every=0,
            checkpoint_every=200,
            threads=1,
        ),
    )


# The ablation tables' fixed budget: about 8 epochs of SynthSOD's 512 training images at batch 4. The papers
# also compare at one fixed schedule; the baseline still gains at 2000 and 4000 iterations
# (results/tables/ablation_plateau).
ABLATION_ITERS = 1000


def _paper() -> RunConfig:
    # RT-DETR-R50 as trained in paper A, §5.2: the released architecture
    # (sodlib.official.rtdetr_model_config(50)), so that RT-DETR's COCO or ImageNet weights initialise it
    # (`sodlib train --init-from`, model.pretrained_path).
    return RunConfig(
        name="paper",
        data=DataConfig(dataset="visdrone", image_size=640, num_classes=10, num_workers=4),
        model=ModelConfig(
            backbone="presnet50vd",
            freeze_at=0,
            num_classes=10,
            hidden_dim=256,
            num_heads=8,
            num_levels=3,
            num_points=4,
            num_queries=300,
            num_decoder_layers=6,
            num_denoising=100,
            pos_embed="rtdetr",
        ),
        train=TrainConfig(
            device="cuda",
            batch_size=16,
            epochs=72,
            lr=2e-4,
            lr_backbone_mult=0.1,
            weight_decay=1e-4,
            warmup_iters=2000,
            ema_decay=0.9999,
            clip_max_norm=0.1,
            amp=True,
        ),
    )


PROFILES = {"smoke": _smoke, "cpu": _cpu, "ablation": _ablation, "paper": _paper}


def get_profile(name: str = "cpu") -> RunConfig:
    """Return the named profile (``smoke``, ``cpu`` or ``paper``) as a fresh RunConfig."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]()


# ---------------------------------------------------------------- overrides


def override(cfg: RunConfig, *assignments: str) -> RunConfig:
    """Return a copy of ``cfg`` with ``"section.key=value"`` assignments applied.

    Values are parsed as JSON where possible (``true``, ``3``, ``[1.5, 1.0]``), else taken as strings,
    then checked against the field's type. Unknown keys and bad values raise ``ValueError``.
    """
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1 and parts[0] == "name":
            top["name"] = raw
            continue
        if len(parts) != 2 or parts[0] not in ("data", "model", "loss", "train"):
            raise ValueError(f"unknown config key {key!r} (expected data.*, model.*, loss.* or train.*)")
        section, name = parts
        sub = getattr(cfg, section)
        types = {f.name: f.type for f in fields(sub)}
        if name not in types:
            raise ValueError(f"unknown config key {key!r}; {section} has {sorted(types)}")
        hint = typing.get_type_hints(type(sub))[name]
        changes.setdefault(section, {})[name] = _coerce(key, _parse(raw), hint)
    new_sections = {s: replace(getattr(cfg, s), **kv) for s, kv in changes.items()}
    return replace(cfg, **new_sections, **top)


def _parse(raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.startswith("(") and text.endswith(")"):
            return _parse("[" + text[1:-1].rstrip(", ") + "]")
        return text


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (elem, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, v, elem) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{key} expects an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} expects a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    raise ValueError(f"{key}: unsupported type {hint}")


def _from_dict(cls, d: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    known = {f.name for f in fields(cls)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in known:
            raise ValueError(f"unknown config key {key!r}")
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _from_dict(hint, v, prefix=f"{k}.")
        else:
            kwargs[k] = _coerce(key, v, hint)
    return cls(**kwargs)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def _check_range(key: str, value, lo=None, hi=None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{key} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{key} must be <= {hi}, got {value!r}")
