import pytest
import torch
from torchvision.models import resnet18, resnet34
from torchvision.ops.misc import FrozenBatchNorm2d

from sodlib.models.backbone import ResNetBackbone, TinyBackbone


def test_resnet18_levels_channels_and_frozen_norm():
    bb = ResNetBackbone(18, return_levels=(2, 3, 4, 5), freeze_norm=True, freeze_at=0)
    assert bb.out_channels == (64, 128, 256, 512) and bb.out_strides == (4, 8, 16, 32)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert not any(p.requires_grad for p in bb.stem.parameters())
    assert all(p.requires_grad for p in bb.stages.parameters())
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 24),
        (1, 128, 8, 12),
        (1, 256, 4, 6),
        (1, 512, 2, 3),
    ]


def test_resnet50_channels_without_building_forward():
    bb = ResNetBackbone(50, freeze_norm=False)
    assert bb.out_channels == (512, 1024, 2048)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())


def test_pretrained_weights_from_local_file(tmp_path):
    ref = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = ResNetBackbone(18, pretrained_path=str(path))
    torch.testing.assert_close(bb.stem[0].weight, ref.conv1.weight)
    torch.testing.assert_close(bb.stages[3][1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(bb.stages[0][0].bn1.running_var, ref.layer1[0].bn1.running_var)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetBackbone(18, pretrained_path=str(tmp_path / "missing.pth"))
    other = tmp_path / "r34.pth"
    torch.save(resnet34(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="r34.pth"):
        ResNetBackbone(18, pretrained_path=str(other))


def test_tiny_backbone_shapes_and_trainable_norm():
    bb = TinyBackbone(width=8, return_levels=(2, 3, 4, 5))
    assert bb.out_channels == (8, 16, 32, 64) and bb.out_strides == (4, 8, 16, 32)
    feats = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert all(p.requires_grad for p in bb.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert len(TinyBackbone(8).forward(torch.randn(1, 3, 64, 64))) == 3
    with pytest.raises(ValueError):
        TinyBackbone(8, return_levels=(5, 3))
