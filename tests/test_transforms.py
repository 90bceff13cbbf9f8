import pytest
import torch
from torchvision import tv_tensors

from sodlib.data.transforms import basic_transforms, build_transforms

W, H = 240, 180
RECT = (60, 50, 150, 120)  # xyxy, pixels


def _sample(with_box=True):
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    x0, y0, x1, y1 = RECT
    img[:, y0:y1, x0:x1] = 255
    boxes = [list(RECT)] if with_box else []
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(H, W)
        ),
        "labels": torch.tensor([3] * len(boxes), dtype=torch.int64),
    }
    return tv_tensors.Image(img), target


def _bright_extent(img):
    g = img.mean(0)
    mask = g > (g.min() + g.max()) / 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _check_consistent(img, target, size):
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, size, size)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    boxes = target["boxes"]
    assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32
    assert boxes.shape[0] == target["labels"].shape[0]
    if boxes.shape[0] == 0:
        return False
    assert boxes.shape == (1, 4) and int(target["labels"][0]) == 3
    assert float(boxes.min()) >= 0.0 and float(boxes.max()) <= 1.0
    cx, cy, w, h = (boxes[0] * size).tolist()
    box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    extent = _bright_extent(img)
    assert torch.all((extent - box).abs() <= 1.0), (extent.tolist(), box.tolist())
    return True


def test_eval_pipeline_keeps_box_on_rectangle():
    tf = build_transforms(128, train=False)
    img, target = tf(*_sample())
    assert _check_consistent(img, target, 128)
    # exact: the resize is a plain scaling
    expected = torch.tensor([(60 + 150) / 2 / W, (50 + 120) / 2 / H, 90 / W, 70 / H])
    assert torch.allclose(target["boxes"][0], expected, atol=1e-6)


@pytest.mark.parametrize("seed", range(24))
def test_train_pipeline_box_covers_bright_pixels(seed):
    torch.manual_seed(seed)
    tf = build_transforms(128, train=True)
    img, target = tf(*_sample())
    _check_consistent(img, target, 128)


def test_train_pipeline_augments_and_handles_empty_targets():
    tf = build_transforms(96, train=True)
    torch.manual_seed(0)
    centres = set()
    for _ in range(12):
        img, target = tf(*_sample())
        if target["boxes"].numel():
            centres.add(round(float(target["boxes"][0, 0]), 3))
    assert len(centres) > 3  # geometry really varies
    img, target = tf(*_sample(with_box=False))
    assert img.shape == (3, 96, 96) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_no_augment_is_deterministic_and_basic_keeps_size():
    tf = build_transforms(64, train=True, augment=False)
    a, ta = tf(*_sample())
    b, tb = tf(*_sample())
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    img, target = basic_transforms()(*_sample())
    assert img.shape == (3, H, W)
    assert torch.allclose(target["boxes"][0], torch.tensor([105 / W, 85 / H, 90 / W, 70 / H]))
