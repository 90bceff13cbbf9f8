import json
import logging
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from sodlib.config import DataConfig
from sodlib.data import shared_data_dir
from sodlib.data.datasets import CocoDetection, VisDroneDataset, build_dataset, collate_fn
from sodlib.data.formats import VISDRONE_CATEGORIES, load_coco, subset_coco, visdrone_to_coco, voc_to_coco
from sodlib.data.transforms import build_transforms

DATA = shared_data_dir()
VISDRONE_MINI = DATA / "visdrone_mini"
VISDRONE_VAL_ANN = DATA / "visdrone_val_annotations"
NEON = DATA / "neon_trees"


def _needs(path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"{path} not available")


def _count_txt(path):
    """Independent reading of a VisDrone annotation file: counts per kind."""
    n = {"valid": 0, "crowd": 0, "regions": 0, "others": 0}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        v = [int(float(s)) for s in line.strip().rstrip(",").split(",")]
        score, cat = v[4], v[5]
        if cat == 0:
            n["regions"] += 1
        elif cat == 11:
            n["others"] += 1
        elif score == 1:
            n["valid"] += 1
        else:
            n["crowd"] += 1
    return n


def _count_coco(coco):
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = {}
    for img in coco["images"]:
        anns = by_image.get(img["id"], [])
        n = {
            "valid": sum(1 for a in anns if a["iscrowd"] == 0 and a["ignore"] == 0),
            "crowd": sum(1 for a in anns if a["iscrowd"] == 1 and a["ignore"] == 1),
            "regions": len(img["ignore_regions_xywh"]),
            "others": len(img["ignored_boxes_xywh"]),
        }
        assert len(anns) == n["valid"] + n["crowd"]
        out[Path(img["file_name"]).stem] = n
    return out


# ---------------------------------------------------------------------------------------------- VisDrone


@_needs(VISDRONE_MINI)
def test_visdrone_mini_counts_match_txt():
    coco = visdrone_to_coco(VISDRONE_MINI)
    txts = sorted((VISDRONE_MINI / "annotations").glob("*.txt"))
    assert len(coco["images"]) == len(txts) == 8
    expected = {p.stem: _count_txt(p) for p in txts}
    assert _count_coco(coco) == expected
    assert sum(e["valid"] for e in expected.values()) == 763
    assert [c["name"] for c in coco["categories"]] == list(VISDRONE_CATEGORIES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    for img in coco["images"]:
        with Image.open(VISDRONE_MINI / "images" / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
    a = coco["annotations"][0]
    assert isinstance(a["bbox"][0], float) and a["area"] == a["bbox"][2] * a["bbox"][3]
    assert coco["info"]["skipped_lines"] == 0
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))


@_needs(VISDRONE_VAL_ANN)
def test_visdrone_val_annotations_only():
    coco = visdrone_to_coco(VISDRONE_VAL_ANN, annotations_only=True)
    txts = sorted(VISDRONE_VAL_ANN.glob("*.txt"))
    assert len(coco["images"]) == len(txts) == 548
    expected = {p.stem: _count_txt(p) for p in txts}
    assert _count_coco(coco) == expected
    totals = {k: sum(e[k] for e in expected.values()) for k in ("valid", "crowd", "regions", "others")}
    assert totals == {"valid": 38759, "crowd": 0, "regions": 1378, "others": 32}
    assert coco["info"]["inferred_sizes"] is True
    by_stem = {Path(i["file_name"]).stem: i for i in coco["images"]}
    if VISDRONE_MINI.is_dir():  # an inferred size is the box extent: never beyond the real image
        for p in (VISDRONE_MINI / "images").glob("*.jpg"):
            with Image.open(p) as im:
                w, h = im.size
            assert 0 < by_stem[p.stem]["width"] <= w and 0 < by_stem[p.stem]["height"] <= h
    sizes = {p.stem: (2000, 1500) for p in txts}
    coco2 = visdrone_to_coco(VISDRONE_VAL_ANN, annotations_only=True, image_sizes=sizes)
    assert {(i["width"], i["height"]) for i in coco2["images"]} == {(2000, 1500)}
    del sizes[txts[3].stem]
    with pytest.raises(ValueError, match=txts[3].stem):
        visdrone_to_coco(VISDRONE_VAL_ANN, annotations_only=True, image_sizes=sizes)


def _visdrone_folder(root, lines, size=(100, 80), stem="img1"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 40, 50)).save(root / "images" / f"{stem}.jpg")
    (root / "annotations" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


SYNTH_LINES = [
    "10,10,20,20,1,4,0,0,",  # valid car, trailing comma
    "30,30,10,10,0,1,0,0",  # score 0 pedestrian -> crowd/ignore
    "0,0,15,15,0,0,0,0",  # ignored region
    "50,50,5,5,1,11,0,0",  # others
    "60,10,0,10,1,4,0,0",  # zero width -> dropped
    "70,20,10,-3,1,4,0,0",  # negative height -> dropped
    "90,70,30,30,1,9,0,0",  # bus partly outside -> clipped to 10x10
    "-5,40,15,10,1,2,1,2",  # people partly left of the image -> clipped
]


def test_visdrone_mapping_drop_and_clip(tmp_path, caplog):
    root = _visdrone_folder(tmp_path / "vd", SYNTH_LINES)
    with caplog.at_level(logging.INFO, logger="sodlib.data.formats"):
        coco = visdrone_to_coco(root)
    assert "dropped 2" in caplog.text
    img = coco["images"][0]
    assert (img["width"], img["height"]) == (100, 80)
    assert img["ignore_regions_xywh"] == [[0.0, 0.0, 15.0, 15.0]]
    assert img["ignored_boxes_xywh"] == [[50.0, 50.0, 5.0, 5.0]]
    anns = {a["category_id"]: a for a in coco["annotations"]}
    assert len(coco["annotations"]) == 4
    assert anns[4]["bbox"] == [10.0, 10.0, 20.0, 20.0] and (anns[4]["iscrowd"], anns[4]["ignore"]) == (0, 0)
    assert (anns[1]["iscrowd"], anns[1]["ignore"]) == (1, 1)
    assert anns[9]["bbox"] == [90.0, 70.0, 10.0, 10.0] and anns[9]["area"] == 100.0
    assert anns[2]["bbox"] == [0.0, 40.0, 10.0, 10.0]
    assert anns[2]["truncation"] == 1 and anns[2]["occlusion"] == 2
    assert coco["info"]["dropped_boxes"] == 2 and coco["info"]["clipped_boxes"] == 2


def test_visdrone_malformed_line_strict_and_lenient(tmp_path):
    lines = ["10,10,20,20,1,4,0,0", "11,11,5,5,1,3,0,0", "12,abc,5,5,1,3,0,0", "1,2,3", "13,13,5,5,1,12,0,0"]
    root = _visdrone_folder(tmp_path / "vd", lines, stem="file")
    with pytest.raises(ValueError, match=r"file\.txt:3: "):
        visdrone_to_coco(root)
    with pytest.warns(UserWarning) as record:
        coco = visdrone_to_coco(root, strict=False)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and any("file.txt:4: expected 8" in m for m in messages)
    assert coco["info"]["skipped_lines"] == 3
    assert len(coco["annotations"]) == 2


def test_visdrone_missing_pairs_named(tmp_path):
    root = _visdrone_folder(tmp_path / "vd", SYNTH_LINES[:1])
    Image.new("RGB", (10, 10)).save(root / "images" / "lonely.jpg")
    with pytest.raises(FileNotFoundError, match="lonely.jpg"):
        visdrone_to_coco(root)
    (root / "images" / "lonely.jpg").unlink()
    (root / "annotations" / "orphan.txt").write_text("1,1,2,2,1,1,0,0\n")
    with pytest.raises(FileNotFoundError, match="orphan.txt"):
        visdrone_to_coco(root)


# ---------------------------------------------------------------------------------------- VOC / COCO json


@_needs(NEON)
def test_voc_neon_trees():
    coco = voc_to_coco(NEON)
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 951
    per_file = {
        p.stem: len(ET.parse(p).getroot().findall("object")) for p in (NEON / "annotations").glob("*.xml")
    }
    got = {
        Path(i["file_name"]).stem: sum(1 for a in coco["annotations"] if a["image_id"] == i["id"])
        for i in coco["images"]
    }
    assert got == per_file
    assert [c["name"] for c in coco["categories"]] == ["Alive", "Dead", "Tree"]  # SOAP_061 uses Alive/Dead
    one = voc_to_coco(NEON, single_class="Tree")
    assert one["categories"] == [{"id": 1, "name": "Tree"}] and len(one["annotations"]) == 951
    for img in one["images"]:
        with Image.open(NEON / "images" / img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
    train = subset_coco(one, ["OSBS_029", "SOAP_061", "2019_YELL_2_528000_4978000_image_crop2"])
    assert (
        len(train["images"]) == 3
        and len(train["annotations"]) == 951 - per_file["2019_YELL_2_541000_4977000_image_crop"]
    )


def _voc_folder(root, size_xml=(64, 48), size_img=(64, 48), with_image=True):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir(parents=True)
    if with_image:
        Image.new("RGB", size_img).save(root / "images" / "a.png")
    (root / "annotations" / "a.xml").write_text(
        f"<annotation><filename>a.png</filename><size><width>{size_xml[0]}</width><height>{size_xml[1]}</height>"
        "</size><object><name>Tree</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>11</xmax><ymax>22</ymax></bndbox></object><object><name>Tree</name><difficult>1</difficult>"
        "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    return root


def test_voc_errors_and_difficult(tmp_path):
    coco = voc_to_coco(_voc_folder(tmp_path / "ok"))
    assert coco["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert (coco["annotations"][1]["iscrowd"], coco["annotations"][1]["ignore"]) == (1, 1)
    with pytest.raises(ValueError, match=r"a\.xml.*does not match"):
        voc_to_coco(_voc_folder(tmp_path / "bad", size_xml=(64, 50)))
    with pytest.raises(FileNotFoundError, match=r"a\.xml.*a\.png"):
        voc_to_coco(_voc_folder(tmp_path / "noimg", with_image=False))


def test_load_coco_validation(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"x\.json.*'annotations'"):
        load_coco(p)
    p.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.png", "width": 4}], "annotations": [], "categories": []}
        )
    )
    with pytest.raises(ValueError, match=r"x\.json.*images\[0\].*'height'"):
        load_coco(p)
    p.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
                "categories": [{"id": 3, "name": "c"}],
            }
        )
    )
    coco = load_coco(p)
    assert coco["annotations"][0]["area"] == 1.0 and coco["annotations"][0]["iscrowd"] == 0


# ---------------------------------------------------------------------------------------------- Dataset


def _coco_folder(tmp_path, split="train"):
    """3 images: two boxes (one crowd), no boxes, one box; category ids 3 and 7 (non-contiguous)."""
    img_dir = tmp_path / "images" / split
    img_dir.mkdir(parents=True)
    sizes = [(120, 80), (64, 64), (50, 100)]
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (10 * i, 20, 30)).save(img_dir / f"im{i}.png")
        images.append({"id": 10 + i, "file_name": f"im{i}.png", "width": w, "height": h})
    anns = [
        {"id": 1, "image_id": 11, "category_id": 7, "bbox": [12, 8, 24, 16], "area": 384, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "bbox": [50, 40, 10, 10], "area": 100, "iscrowd": 1},
        {"id": 3, "image_id": 13, "category_id": 3, "bbox": [0, 0, 50, 25], "area": 1250, "iscrowd": 0},
    ]
    coco = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return img_dir, tmp_path / "annotations" / f"instances_{split}.json"


def test_coco_detection_items(tmp_path):
    img_dir, ann = _coco_folder(tmp_path)
    ds = CocoDetection(img_dir, ann, transforms=build_transforms(32, train=False))
    assert len(ds) == 3 and ds.category_ids == [3, 7] and ds.names == ["three", "seven"]
    img, t = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert set(t) == {"boxes", "labels", "image_id", "orig_size", "size"}
    assert t["image_id"] == 11 and t["orig_size"].tolist() == [80, 120] and t["size"].tolist() == [32, 32]
    assert t["labels"].tolist() == [1] and t["labels"].dtype == torch.int64  # crowd box excluded
    assert torch.allclose(t["boxes"], torch.tensor([[24 / 120, 16 / 80, 24 / 120, 16 / 80]]))
    img, t = ds[1]  # no boxes
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32 and t["labels"].shape == (0,)
    _, t = ds[2]
    assert t["labels"].tolist() == [0] and t["orig_size"].tolist() == [100, 50]
    assert ds.label_to_category_id(t["labels"]) == [3]

    train = CocoDetection(img_dir, json.loads(ann.read_text()), transforms=build_transforms(32, train=True))
    images, targets = collate_fn([train[i] for i in range(3)])
    assert images.shape == (3, 3, 32, 32) and len(targets) == 3
    assert all(t["boxes"].shape[1] == 4 and t["boxes"].shape[0] == t["labels"].shape[0] for t in targets)

    raw = CocoDetection(img_dir, ann)  # no transforms: source resolution
    img, t = raw[0]
    assert img.shape == (3, 80, 120) and t["size"].tolist() == [80, 120]


def test_coco_detection_missing_image(tmp_path):
    img_dir, ann = _coco_folder(tmp_path)
    (img_dir / "im2.png").unlink()
    ds = CocoDetection(img_dir, ann)
    with pytest.raises(FileNotFoundError, match="im2.png"):
        ds[1]
    (img_dir / "im3.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="im3.png"):
        ds[2]


def test_collate_rejects_mixed_sizes():
    with pytest.raises(ValueError):
        collate_fn([(torch.zeros(3, 8, 8), {}), (torch.zeros(3, 8, 9), {})])


def test_build_dataset_layouts(tmp_path, monkeypatch):
    _coco_folder(tmp_path / "coco", split="val")
    ds = build_dataset(
        DataConfig(dataset="coco", root=str(tmp_path / "coco"), image_size=32, num_classes=2),
        "val",
        train=False,
    )
    assert len(ds) == 3 and ds[0][0].shape == (3, 32, 32)

    _visdrone_folder(tmp_path / "vd" / "VisDrone2019-DET-val", SYNTH_LINES)
    cfg = DataConfig(dataset="visdrone", root=str(tmp_path / "vd"), image_size=32, num_classes=10)
    for split in ("VisDrone2019-DET-val", "val"):
        ds = build_dataset(cfg, split, train=True)
        img, _ = ds[0]
        assert img.shape == (3, 32, 32) and isinstance(ds.coco["images"][0]["ignore_regions_xywh"], list)
    assert isinstance(VisDroneDataset(tmp_path / "vd" / "VisDrone2019-DET-val"), CocoDetection)

    if NEON.is_dir():
        ds = build_dataset(DataConfig(dataset="voc", root=str(NEON), num_classes=1), "all", train=False)
        assert ds.names == ["Tree"] and len(ds) == 4
        with pytest.raises(FileNotFoundError):
            build_dataset(DataConfig(dataset="voc", root=str(NEON), num_classes=1), "train", train=False)

    # synthsod: generated on demand through synth.ensure_split (a stand-in module here)
    calls = []

    def ensure_split(out_dir, split, num_images, size, seed=0):
        calls.append((Path(out_dir), split, num_images, size, seed))
        return _coco_folder(Path(out_dir), split=split)[1]

    import sodlib.data.datasets

    monkeypatch.setattr(sodlib.data.datasets, "synth", types.SimpleNamespace(ensure_split=ensure_split))
    monkeypatch.setenv("SODLIB_DATA", str(tmp_path / "cache"))
    cfg = DataConfig(image_size=64, synth_seed=3, synth_val_images=5)
    ds = build_dataset(cfg, "val", train=False)
    assert calls == [(tmp_path / "cache" / "synthsod_s64_seed3", "val", 5, 64, 3)]
    assert len(ds) == 3 and ds[0][0].shape == (3, 64, 64)


@pytest.mark.parametrize("file_name", ["../secret.png", "/etc/passwd", "sub/../../x.png", "."])
def test_file_names_must_stay_inside_the_image_folder(tmp_path, file_name):
    from sodlib.data.datasets import CocoDetection

    coco = {
        "images": [{"id": 7, "file_name": file_name, "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "car"}],
    }
    (tmp_path / "images").mkdir()
    with pytest.raises(
        ValueError, match=r"image 7 file_name .* lies outside the image folder .*allow_outside_paths"
    ):
        CocoDetection(tmp_path / "images", coco)
    CocoDetection(tmp_path / "images", coco, allow_outside=True)  # when the user says so
    inside = {**coco, "images": [{"id": 1, "file_name": "sub/./a.png", "width": 8, "height": 8}]}
    CocoDetection(tmp_path / "images", inside)


def test_a_non_finite_box_in_a_coco_json_is_named(tmp_path):
    import json

    from sodlib.data.formats import load_coco

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, float("nan"), 2]}],
        "categories": [{"id": 1, "name": "car"}],
    }
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(coco))  # json.dumps writes NaN, as many tools do
    with pytest.raises(
        ValueError, match=r"instances_train.json: annotations\[0\] \(id 5\) 'bbox' .* is not finite"
    ):
        load_coco(path)


def test_a_coco_dataset_checks_its_images_when_built(tmp_path):
    import json

    from PIL import Image as PILImage

    from sodlib.config import DataConfig
    from sodlib.data.datasets import build_dataset

    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    PILImage.new("RGB", (20, 10)).save(tmp_path / "images" / "val" / "good.png")
    (tmp_path / "images" / "val" / "broken.png").write_bytes(b"\x89PNG\r\n cut short")
    images = [
        {"id": 1, "file_name": "good.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "broken.png", "width": 20, "height": 10},
    ]
    cats = [{"id": 1, "name": "car"}]

    def build(imgs):
        (tmp_path / "annotations" / "instances_val.json").write_text(
            json.dumps({"images": imgs, "annotations": [], "categories": cats})
        )
        return build_dataset(
            DataConfig(dataset="coco", root=str(tmp_path), num_classes=1, image_size=64), "val", train=False
        )

    with pytest.raises(ValueError, match=r"cannot read image .*broken.png \(image id 2\)"):
        build(images)
    with pytest.raises(ValueError, match=r"good.png is 20x10 but its record says 30x10"):
        build([{**images[0], "width": 30}])
    assert len(build(images[:1])) == 1


def test_an_unparsable_voc_xml_is_named_in_the_single_class_path(tmp_path):
    from sodlib.config import DataConfig
    from sodlib.data.datasets import build_dataset

    (tmp_path / "all" / "annotations").mkdir(parents=True)
    (tmp_path / "all" / "images").mkdir()
    (tmp_path / "all" / "annotations" / "tile.xml").write_text("<annotation><object><name>Tree</name>")
    with pytest.raises(ValueError, match=r"tile.xml: not valid XML"):
        build_dataset(DataConfig(dataset="voc", root=str(tmp_path), num_classes=1), "all", train=False)
