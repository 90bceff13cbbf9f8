"""SAHI drives sodlib detectors (sodlib[sahi]); its sliced prediction agrees with predict --slice."""

import numpy as np
import pytest
import torch

pytest.importorskip("sahi")
from sahi.predict import get_prediction

from sodlib.build import build_detector
from sodlib.checkpoints import save_checkpoint
from sodlib.config import get_profile, override
from sodlib.data.formats import visdrone_to_coco
from sodlib.inference.predict import predict_image
from sodlib.inference.sahi import SodlibDetectionModel, compare_sliced


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = override(get_profile("cpu"), "data.num_classes=10", "model.num_classes=10")
    torch.manual_seed(0)
    model = build_detector(cfg.model)
    with torch.no_grad():  # scores off the 1% prior: detections of varied confidence
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("sahi") / "last.pt"
    save_checkpoint(path, model=model.state_dict(), config=cfg.to_dict())
    return path


def test_one_window_through_sahi_equals_predict_image(checkpoint):
    sahi_model = SodlibDetectionModel(model_path=str(checkpoint), confidence_threshold=0.0, device="cpu")
    assert sahi_model.image_size == 320 and sahi_model.num_categories == 10
    image = (torch.rand(3, 240, 300) * 255).to(torch.uint8)
    result = get_prediction(image.permute(1, 2, 0).numpy(), sahi_model)
    ours = predict_image(sahi_model.model, image, 320, num_top=100)
    ours["boxes_xyxy"][:, 0::2] = ours["boxes_xyxy"][:, 0::2].clamp(0, 300)  # SAHI clips boxes to the image
    ours["boxes_xyxy"][:, 1::2] = ours["boxes_xyxy"][:, 1::2].clamp(0, 240)
    got = sorted((p.score.value, p.category.id, *p.bbox.to_xyxy()) for p in result.object_prediction_list)
    expected = sorted(
        (s, lab, *b)
        for s, lab, b in zip(ours["scores"].tolist(), ours["labels"].tolist(), ours["boxes_xyxy"].tolist())
    )
    assert len(got) == len(expected) == 100
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-3)
    with pytest.raises(ValueError, match="image_size"):
        SodlibDetectionModel(model=sahi_model.model)


@pytest.mark.slow
def test_sliced_sahi_agrees_with_predict_slice_on_visdrone(checkpoint, shared_data):
    visdrone = shared_data / "visdrone_mini"
    image = min((visdrone / "images").glob("*.jpg"))
    rows = {r["pipeline"]: r for r in compare_sliced(checkpoint, [image], visdrone_to_coco(visdrone), 640)}
    ours, sahi_nms = rows["sodlib predict --slice"], rows["SAHI, sodlib's merge (NMS IoU 0.5, slices only)"]
    assert ours["agreement"] == 1.0 and ours["detections"] > 0
    assert (
        sahi_nms["agreement"] >= 0.9
        and abs(sahi_nms["detections"] - ours["detections"]) <= 0.1 * ours["detections"]
    )
