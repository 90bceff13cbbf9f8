"""neon_trees patches: counts against an independent count, no test-tile leak, cache reuse, atomic builds,
errors naming the file, and the absent-data path."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sodlib.config import DataConfig
from sodlib.data import realdata, shared_data_dir
from sodlib.data.datasets import build_dataset, data_cache_dir
from sodlib.data.formats import load_coco

PATCH, OVERLAP = 320, 80


# ---------------------------------------------------------------- an independent count


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts written out again: 0, s, 2s, ... below size - tile, then size - tile."""
    if size <= tile:
        return [0]
    out, x = [], 0
    while x < size - tile:
        out.append(x)
        x += tile - overlap
    return [*out, size - tile]


def _voc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(xml_path).getroot()
    return [
        tuple(float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
        for obj in root.iter("object")
    ]


def _expected(src: Path, stems, tile: int, overlap: int) -> dict[str, tuple[int, int]]:
    """patch file name -> (kept boxes, ignore boxes), straight from the xml and the image size."""
    out = {}
    for stem in stems:
        width, height = Image.open(src / "images" / f"{stem}.png").size
        boxes = np.array(_voc_boxes(src / "annotations" / f"{stem}.xml"))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for y0 in _starts(height, tile, overlap):
            for x0 in _starts(width, tile, overlap):
                x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
                iw = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
                ih = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
                frac = iw * ih / area
                out[f"{stem}_{x0}_{y0}.png"] = (
                    int((frac >= 0.5).sum()),
                    int(((frac > 0) & (frac < 0.5)).sum()),
                )
    return out


def _observed(coco: dict) -> dict[str, tuple[int, int]]:
    kept = {img["id"]: [0, 0] for img in coco["images"]}
    for a in coco["annotations"]:
        kept[a["image_id"]][int(a["iscrowd"])] += 1
    return {img["file_name"]: tuple(kept[img["id"]]) for img in coco["images"]}


@pytest.fixture(scope="module")
def neon_root(tmp_path_factory):
    src = realdata.find_neon_trees()
    if src is None:
        pytest.skip("../shared/data/neon_trees is absent")
    return src, realdata.neon_patches(src, tmp_path_factory.mktemp("neon"), patch=PATCH, overlap=OVERLAP)


def test_box_counts_per_split_match_an_independent_count(neon_root):
    src, root = neon_root
    manifest = realdata.read_manifest(root)
    for split, stems in (("train", realdata.NEON_TRAIN), ("test", [realdata.NEON_TEST])):
        coco = load_coco(root / "annotations" / f"instances_{split}.json")
        expected = _expected(src, stems, PATCH, OVERLAP)
        assert _observed(coco) == expected
        kept, ignored = (sum(v[i] for v in expected.values()) for i in (0, 1))
        counts = manifest["counts"][split]
        assert (counts["patches"], counts["boxes"], counts["ignore_boxes"]) == (len(expected), kept, ignored)
        for a in coco["annotations"]:  # clipped into the patch
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= PATCH + 1e-6 and y + h <= PATCH + 1e-6
        assert len(list((root / "images" / split).glob("*.png"))) == len(expected)
    # the README's numbers: 951 boxes over the four tiles; 279 on the test tile
    assert manifest["counts"]["train"]["source_boxes"] + manifest["counts"]["test"]["source_boxes"] == 951
    assert manifest["counts"]["test"]["source_boxes"] == 279
    assert manifest["counts"]["test"]["empty_patches"] == 0  # the test split keeps every patch anyway


def test_every_crown_no_wider_than_the_overlap_is_whole_in_some_patch(neon_root):
    _, root = neon_root
    for split in ("train", "test"):
        tiles = load_coco(root / "annotations" / f"tiles_{split}.json")
        patches = load_coco(root / "annotations" / f"instances_{split}.json")
        whole = {a["source_ann_id"] for a in patches["annotations"] if a["visible"] == 1.0}
        small = {a["id"] for a in tiles["annotations"] if max(a["bbox"][2:]) <= OVERLAP}
        assert small and small <= whole


def test_the_test_tile_never_reaches_training(neon_root):
    src, root = neon_root
    train = load_coco(root / "annotations" / "instances_train.json")
    test = load_coco(root / "annotations" / "instances_test.json")
    assert {Path(i["source_file_name"]).stem for i in train["images"]} == set(realdata.NEON_TRAIN)
    assert {Path(i["source_file_name"]).stem for i in test["images"]} == {realdata.NEON_TEST}
    assert not [p for p in (root / "images" / "train").iterdir() if p.name.startswith(realdata.NEON_TEST)]
    # a test patch holds the pixels of the test tile at its offset, at native resolution
    rec = test["images"][len(test["images"]) // 2]
    x0, y0 = rec["offset"]
    with Image.open(src / "images" / f"{realdata.NEON_TEST}.png") as im:
        crop = np.asarray(im.convert("RGB").crop((x0, y0, x0 + PATCH, y0 + PATCH)))
    assert np.array_equal(np.asarray(Image.open(root / "images" / "test" / rec["file_name"])), crop)


def test_patch_root_loads_as_a_one_class_coco_dataset(neon_root):
    _, root = neon_root
    cfg = DataConfig(
        dataset="coco", root=root.name, image_size=PATCH, num_classes=1, val_split="test", augment="none"
    )
    test = build_dataset(cfg, "test", train=False, data_root=str(root))  # data_root wins over data.root
    assert test.names == ["Tree"] and len(test) == 20
    image, target = test[0]
    assert image.shape == (3, PATCH, PATCH) and len(target["boxes"]) > 0


# ---------------------------------------------------------------- a small synthetic VOC folder


def _write_voc(root: Path, name: str, size: tuple[int, int], boxes, label: str = "Tree") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        root / "images" / f"{name}.png"
    )
    objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    (root / "annotations" / f"{name}.xml").write_text(
        f"<annotation><filename>{name}.png</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"</size>{objects}</annotation>"
    )


@pytest.fixture
def voc(tmp_path) -> Path:
    src = tmp_path / "voc"
    _write_voc(src, "a", (150, 100), [(5, 5, 20, 25), (70, 40, 90, 60), (100, 60, 140, 95)])
    _write_voc(src, "b", (100, 100), [(10, 10, 30, 30)], label="Dead")  # folded into Tree
    _write_voc(src, "t", (120, 80), [(50, 20, 70, 40), (0, 0, 10, 10)])
    return src


def _patches(src, out, **kw):
    return realdata.neon_patches(src, out, patch=64, overlap=16, train_stems=["a", "b"], test_stem="t", **kw)


def test_synthetic_counts_and_default_cache_folder(voc, monkeypatch, tmp_path):
    monkeypatch.setenv("SODLIB_DATA", str(tmp_path / "cache"))
    root = _patches(voc, None)
    assert root.parent == data_cache_dir() == tmp_path / "cache"
    assert root.name == realdata.patch_dataset_name(64, 16, realdata.read_manifest(root)["fingerprint"])
    for split, stems in (("train", ["a", "b"]), ("test", ["t"])):
        coco = load_coco(root / "annotations" / f"instances_{split}.json")
        assert _observed(coco) == _expected(voc, stems, 64, 16)
        assert [c["name"] for c in coco["categories"]] == ["Tree"]


def test_cache_is_reused_and_keyed_by_parameters_and_source_bytes(voc, tmp_path, monkeypatch):
    first = _patches(voc, tmp_path / "out")
    marker = (first / realdata.MANIFEST).stat().st_mtime_ns

    def no_cutting(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(realdata, "tile_coco", no_cutting)
    assert _patches(voc, tmp_path / "out") == first
    assert (first / realdata.MANIFEST).stat().st_mtime_ns == marker
    monkeypatch.undo()
    assert (
        realdata.neon_patches(
            voc, tmp_path / "out", patch=64, overlap=8, train_stems=["a", "b"], test_stem="t"
        )
        != first
    )
    xml = voc / "annotations" / "t.xml"
    xml.write_text(xml.read_text().replace("<xmax>70</xmax>", "<xmax>72</xmax>"))
    assert _patches(voc, tmp_path / "out") != first  # edited annotations: a new folder


def test_interrupted_build_leaves_nothing_and_a_leftover_is_rebuilt(voc, tmp_path, monkeypatch):
    real = realdata.tile_coco

    def fail_on_test(*args, split="train", **kwargs):
        if split == "test":
            raise KeyboardInterrupt  # interrupted half way, after the train split was written
        return real(*args, split=split, **kwargs)

    monkeypatch.setattr(realdata, "tile_coco", fail_on_test)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _patches(voc, out)
    assert list(out.iterdir()) == []  # neither a final folder nor a temporary one
    monkeypatch.undo()

    root = _patches(voc, out)
    for p in sorted(root.rglob("*"), reverse=True):  # a half-written folder under the final name
        p.unlink() if p.is_file() else p.rmdir()
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "junk.png").write_bytes(b"half")
    assert realdata.read_manifest(root) is None
    assert _patches(voc, out) == root
    assert realdata.read_manifest(root) is not None and not (root / "images" / "train" / "junk.png").exists()
    assert [p.name for p in out.iterdir()] == [root.name]


def test_drop_empty_train_removes_only_train_patches_without_targets(voc, tmp_path):
    kept = _patches(voc, tmp_path / "keep")
    dropped = _patches(voc, tmp_path / "drop", drop_empty_train=True)
    counts = {k: realdata.read_manifest(r)["counts"] for k, r in (("keep", kept), ("drop", dropped))}
    assert counts["keep"]["train"]["empty_patches"] > 0 and counts["drop"]["train"]["empty_patches"] == 0
    assert (
        counts["drop"]["train"]["patches"]
        == counts["keep"]["train"]["patches"] - counts["keep"]["train"]["empty_patches"]
    )
    assert counts["drop"]["train"]["boxes"] == counts["keep"]["train"]["boxes"]
    assert counts["drop"]["test"] == counts["keep"]["test"]
    coco = json.loads((dropped / "annotations" / "instances_train.json").read_text())
    assert sorted(p.name for p in (dropped / "images" / "train").iterdir()) == sorted(
        i["file_name"] for i in coco["images"]
    )


def test_bad_input_names_the_file(voc, tmp_path):
    (voc / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.xml"):
        _patches(voc, tmp_path / "out")
    _write_voc(voc, "b", (100, 100), [(10, 10, 30, 30)])
    (voc / "annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match=r"a\.xml"):
        _patches(voc, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope"):
        realdata.neon_patches(voc, tmp_path / "out", patch=64, train_stems=["b"], test_stem="nope")
    with pytest.raises(ValueError, match="both a train and the test tile"):
        realdata.neon_patches(voc, tmp_path / "out", patch=64, train_stems=["a", "t"], test_stem="t")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_absent_data_is_reported_not_crashed(tmp_path):
    assert realdata.find_neon_trees(tmp_path / "nope") is None
    (tmp_path / "half" / "images").mkdir(parents=True)  # no annotations/: not the data set
    assert realdata.find_neon_trees(tmp_path / "half") is None
    with pytest.raises(realdata.NeonTreesAbsent, match="nope") as info:
        realdata.neon_patches(tmp_path / "nope", tmp_path / "out")
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "out").exists()
    assert realdata.find_neon_trees("") in (None, shared_data_dir() / "neon_trees")


# ---------------------------------------------------------------- VisDrone patches


def test_visdrone_patches_keep_every_valid_box_and_the_ten_classes(tmp_path):
    src = realdata.find_visdrone_mini()
    if src is None:
        pytest.skip("../shared/data/visdrone_mini is absent")
    root = realdata.visdrone_patches(src, tmp_path, patch=PATCH)
    assert root.name.startswith(f"visdrone_p{PATCH}_o{OVERLAP}_")
    counts = realdata.read_manifest(root)["counts"]
    assert counts["train"] == counts["test"]  # the eight images are both splits (see the docstring)
    # every valid box (score 1, category 1-10) counted straight from the txt files
    valid = 0
    for txt in (src / "annotations").glob("*.txt"):
        for line in txt.read_text().splitlines():
            f = line.strip().rstrip(",").split(",")
            if len(f) >= 6 and f[4] == "1" and 1 <= int(f[5]) <= 10 and float(f[2]) > 0 and float(f[3]) > 0:
                valid += 1
    tiles = load_coco(root / "annotations" / "tiles_train.json")
    assert sum(1 for a in tiles["annotations"] if not a["iscrowd"]) == valid
    assert counts["train"]["tiles"] == 8
    ds = build_dataset(
        DataConfig(dataset="coco", root=str(root), num_classes=10, image_size=PATCH, augment="none"),
        "train",
        train=False,
    )
    assert ds.num_classes == 10 and len(ds) == counts["train"]["patches"]
    with pytest.raises(FileNotFoundError, match="nope"):
        realdata.visdrone_patches(tmp_path / "nope", tmp_path / "out")
