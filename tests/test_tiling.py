import itertools
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from sodlib.data.tiling import merge_tile_detections, tile_coco, tile_coco_annotations, tile_windows


@pytest.mark.parametrize(
    "width,height,tile,overlap",
    [
        (1920, 1080, 800, 150),
        (2299, 2472, 800, 150),
        (1000, 700, 400, 100),
        (801, 800, 800, 150),
        (500, 300, 800, 150),
        (1360, 765, 640, 0),
    ],
)
def test_tile_windows_cover_with_overlap(width, height, tile, overlap):
    wins = tile_windows(width, height, tile, overlap)
    covered = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for axis in (0, 1):
        starts = sorted({w[axis] for w in wins})
        size = (width, height)[axis]
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size  # last aligned to the border
        for a, b in itertools.pairwise(starts):
            assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`
            assert b - a <= tile - overlap  # and never by less (stride bound)
    assert len(wins) == len(set(wins))


def test_tile_windows_small_image_kept_whole_and_bad_args():
    assert tile_windows(300, 200, 800, 150) == [(0, 0, 300, 200)]
    assert tile_windows(1000, 700, 400, 100) == [
        (0, 0, 400, 400),
        (300, 0, 700, 400),
        (600, 0, 1000, 400),
        (0, 300, 400, 700),
        (300, 300, 700, 700),
        (600, 300, 1000, 700),
    ]
    with pytest.raises(ValueError):
        tile_windows(100, 100, 800, 800)


def _synthetic_coco(width=1000, height=700, seed=0):
    """Disjoint boxes (<= 80 px, below the overlap) on a jittered grid, some across tile borders."""
    rng = random.Random(seed)
    anns = []
    for gy in range(0, height - 100, 100):
        for gx in range(0, width - 100, 100):
            w, h = rng.uniform(8, 80), rng.uniform(8, 80)
            x, y = gx + rng.uniform(0, 99 - w), gy + rng.uniform(0, 99 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 7,
                    "category_id": rng.choice([1, 2]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "ignore": 0,
                }
            )
    # boxes straddling the window borders x=300/400, y=300/400, and touching the image border
    for k, (bx, by) in enumerate([(370.5, 50.5), (280.25, 370.75), (650.5, 360.5), (930.5, 620.5), (0, 0)]):
        anns = [
            a
            for a in anns
            if box_iou(
                torch.tensor([[bx, by, bx + 60, by + 60]]),
                torch.tensor(
                    [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]]
                ),
            ).item()
            == 0
        ]
        anns.append(
            {
                "id": 1000 + k,
                "image_id": 7,
                "category_id": 2,
                "bbox": [bx, by, 60.0, 60.0],
                "area": 3600.0,
                "iscrowd": 0,
                "ignore": 0,
            }
        )
    return {
        "images": [
            {
                "id": 7,
                "file_name": "big.png",
                "width": width,
                "height": height,
                "ignore_regions_xywh": [[350.0, 350.0, 100.0, 100.0]],
            }
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_tile_round_trip(tmp_path):
    coco = _synthetic_coco()
    src = tmp_path / "src"
    src.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (700, 1000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "big.png")

    out = tmp_path / "tiles"
    tiles = tile_coco(coco, src, out, tile=400, overlap=100, min_visible=0.5, split="val")
    assert len(tiles["images"]) == 6
    on_disk = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert len(on_disk["images"]) == 6 and len(on_disk["annotations"]) == len(tiles["annotations"])
    for rec in tiles["images"]:
        assert rec["tile_of"] == 7
        x0, y0 = rec["offset"]
        patch = np.asarray(Image.open(out / "images" / "val" / rec["file_name"]))
        assert patch.shape == (rec["height"], rec["width"], 3)
        assert np.array_equal(patch, pixels[y0 : y0 + rec["height"], x0 : x0 + rec["width"]])
        for r in rec["ignore_regions_xywh"]:  # clipped into the patch
            assert r[0] >= 0 and r[1] >= 0 and r[0] + r[2] <= rec["width"] and r[1] + r[3] <= rec["height"]
    assert sum(len(r["ignore_regions_xywh"]) for r in tiles["images"]) == 4  # the region spans 4 patches

    # every kept piece shows >= min_visible of its box; smaller pieces are ignore annotations
    assert all(a["visible"] >= 0.5 for a in tiles["annotations"] if not a["ignore"])
    assert any(a["ignore"] for a in tiles["annotations"])

    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in tiles["annotations"]
        if not a["ignore"]
    ]
    assert len(dets) > len(coco["annotations"])  # duplicates from the overlaps exist before merging
    merged = merge_tile_detections(dets, tiles, iou_thr=0.5)
    assert all(d["image_id"] == 7 for d in merged)
    assert len(merged) == len(coco["annotations"])
    gt = torch.tensor([_xyxy(a["bbox"]) for a in coco["annotations"]], dtype=torch.float64)
    pr = torch.tensor([_xyxy(d["bbox"]) for d in merged], dtype=torch.float64)
    iou = box_iou(gt, pr)
    hits = iou > 0.99
    assert torch.all(hits.sum(1) == 1), "every source box is recovered exactly once"
    assert torch.all(hits.sum(0) == 1)
    for i, j in torch.nonzero(hits).tolist():
        assert coco["annotations"][i]["category_id"] == merged[j]["category_id"]


def test_small_image_single_patch_and_crowd_kept():
    coco = {
        "images": [{"id": 1, "file_name": "s.jpg", "width": 300, "height": 200}],
        "annotations": [
            {
                "id": 5,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "area": 400,
                "iscrowd": 1,
                "ignore": 1,
            }
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    t = tile_coco_annotations(coco, tile=800, overlap=150)
    assert len(t["images"]) == 1 and t["images"][0]["offset"] == [0, 0]
    assert t["images"][0]["width"] == 300 and t["images"][0]["height"] == 200
    assert t["annotations"][0]["iscrowd"] == 1 and t["annotations"][0]["source_ann_id"] == 5


def test_merge_rejects_unknown_patch_and_missing_image(tmp_path):
    coco = _synthetic_coco()
    tiles = tile_coco_annotations(coco, 400, 100)
    with pytest.raises(ValueError, match="unknown patch"):
        merge_tile_detections([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], tiles)
    with pytest.raises(FileNotFoundError, match="big.png"):
        tile_coco(coco, tmp_path, tmp_path / "out", tile=400, overlap=100)
