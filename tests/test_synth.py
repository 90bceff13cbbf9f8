"""SynthSOD generator: determinism, prefix property, size distribution, crash-safe splits, stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sodlib.data import datastats, synth


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _png_bytes(root, split):
    folder = root / "images" / split
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _iou_pairs(bboxes):
    b = np.asarray(bboxes, float).reshape(-1, 4)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    inter = iw * ih
    np.fill_diagonal(inter, 0)
    return int((inter > 0).sum() // 2)


@pytest.fixture(scope="module")
def sample_320():
    """100 images at the cpu profile's working size, generated once for the distribution tests."""
    return [synth.generate_image(synth.image_seed(0, "train", i), 320) for i in range(100)]


def test_classes_and_seeds():
    assert synth.CLASSES == ("car", "van", "truck", "tank", "silo", "plane")
    assert synth.split_seed(0, "train") != synth.split_seed(0, "val")
    assert synth.split_seed(0, "train") != synth.split_seed(1, "train")
    assert synth.split_seed(3, "val") == synth.split_seed(3, "val")
    assert 0 <= synth.split_seed(2**40, "train") < 2**63
    a, _ = synth.generate_image(synth.image_seed(0, "train", 0), 96)
    b, _ = synth.generate_image(synth.image_seed(0, "val", 0), 96)
    assert not np.array_equal(a, b)


def test_generate_image_deterministic_and_accepts_seed_types():
    a, anns_a = synth.generate_image(np.random.SeedSequence(5), 128)
    b, anns_b = synth.generate_image(np.random.default_rng(np.random.SeedSequence(5)), 128)
    c, anns_c = synth.generate_image(5, 128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, c) and anns_a == anns_b == anns_c
    d, _ = synth.generate_image(6, 128)
    assert not np.array_equal(a, d)


def test_write_split_deterministic(tmp_path):
    p1 = synth.write_split(tmp_path / "a", "train", 3, 96, seed=1, progress=False)
    p2 = synth.write_split(tmp_path / "b", "train", 3, 96, seed=1, progress=False)
    synth.write_split(tmp_path / "c", "train", 3, 96, seed=2, progress=False)
    assert p1.read_bytes() == p2.read_bytes()
    assert _png_bytes(tmp_path / "a", "train") == _png_bytes(tmp_path / "b", "train")
    assert _png_bytes(tmp_path / "a", "train") != _png_bytes(tmp_path / "c", "train")
    coco = _read(p1)
    assert [im["file_name"] for im in coco["images"]] == ["000000.png", "000001.png", "000002.png"]
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert coco["images"][0]["width"] == coco["images"][0]["height"] == 96
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5, 6]
    assert {c["supercategory"] for c in coco["categories"]} == {"synthsod"}
    assert coco["info"]["seed"] == 1 and coco["info"]["split"] == "train" and coco["info"]["num_images"] == 3
    assert coco["info"]["size"] == 96 and coco["info"]["ignore_regions"] is False
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    for a in coco["annotations"]:
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01)
        assert a["iscrowd"] == 0 and a["ignore"] == 0
    # no partial folders left behind
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["train"]
    assert sorted(p.name for p in (tmp_path / "a" / "annotations").iterdir()) == ["instances_train.json"]


def test_prefix_property(tmp_path, monkeypatch):
    short = _read(synth.write_split(tmp_path / "short", "val", 3, 96, progress=False))
    long_ = _read(synth.write_split(tmp_path / "long", "val", 6, 96, progress=False))
    pngs_s, pngs_l = _png_bytes(tmp_path / "short", "val"), _png_bytes(tmp_path / "long", "val")
    assert all(pngs_s[k] == pngs_l[k] for k in pngs_s) and len(pngs_l) == 6
    strip = [{k: a[k] for k in ("image_id", "category_id", "bbox")} for a in short["annotations"]]
    assert strip == [
        {k: a[k] for k in ("image_id", "category_id", "bbox")}
        for a in long_["annotations"]
        if a["image_id"] <= 3
    ]
    # growing a split in place reuses the first images and equals a fresh generation
    calls, real = [], synth.generate_image
    monkeypatch.setattr(synth, "generate_image", lambda *a: calls.append(a) or real(*a))
    grown = synth.write_split(tmp_path / "short", "val", 6, 96, progress=False, reuse=True)
    assert len(calls) == 3
    assert _read(grown)["annotations"] == long_["annotations"]
    assert _png_bytes(tmp_path / "short", "val") == pngs_l


def test_size_distribution_and_box_validity(sample_320):
    sqrt_areas, counts, pairs = [], [], 0
    for image, anns in sample_320:
        assert image.shape == (320, 320, 3)
        counts.append(len(anns))
        pairs += _iou_pairs([a["bbox"] for a in anns]) > 0
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 320 + 1e-6 and y + h <= 320 + 1e-6
            assert a["category_id"] in range(1, 7) and a["iscrowd"] == 0
            sqrt_areas.append(np.sqrt(w * h))
    s = np.asarray(sqrt_areas)
    assert 0.22 <= (s < 16).mean() <= 0.38
    assert 0.62 <= (s < 32).mean() <= 0.78
    assert s.min() >= 3.0  # the smallest objects stay a few pixels wide
    assert 15 <= np.mean(counts) <= 45 and max(counts) >= 50
    assert pairs >= 50  # dense clusters: most images have overlapping boxes
    cats = {a["category_id"] for _, anns in sample_320 for a in anns}
    assert cats == {1, 2, 3, 4, 5, 6}


def test_ignore_regions(tmp_path):
    path = synth.write_split(tmp_path, "train", 12, 160, ignore_regions=True, progress=False)
    coco = _read(path)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd and all(a["ignore"] == 1 for a in crowd)
    # one crowd annotation per class inside a region: (image, category) pairs are unique
    assert len({(a["image_id"], a["category_id"]) for a in crowd}) == len(crowd)
    df = datastats.box_stats(path)
    assert len(df) == len(coco["annotations"]) - len(crowd)
    _, anns = synth.generate_image(synth.image_seed(0, "train", 0), 160)
    assert all(a["iscrowd"] == 0 for a in anns)  # off by default


def test_ensure_split_regenerates_only_on_change(tmp_path, monkeypatch):
    calls = []
    real = synth.write_split
    monkeypatch.setattr(synth, "write_split", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = synth.ensure_split(tmp_path, "train", 2, 64, progress=False)
    assert len(calls) == 1 and _read(p)["info"]["size"] == 64
    assert synth.ensure_split(tmp_path, "train", 2, 64, progress=False) == p and len(calls) == 1
    synth.ensure_split(tmp_path, "train", 2, 80, progress=False)
    assert len(calls) == 2 and _read(p)["info"]["size"] == 80
    synth.ensure_split(tmp_path, "train", 2, 80, seed=4, progress=False)
    synth.ensure_split(tmp_path, "train", 3, 80, seed=4, progress=False)
    synth.ensure_split(tmp_path, "train", 3, 80, seed=4, ignore_regions=True, progress=False)
    assert len(calls) == 5 and _read(p)["info"]["ignore_regions"] is True
    synth.ensure_split(tmp_path, "train", 3, 80, seed=4, ignore_regions=True, progress=False)
    assert len(calls) == 5
    (tmp_path / "images" / "train" / "000001.png").unlink()  # damaged split is rebuilt
    synth.ensure_split(tmp_path, "train", 3, 80, seed=4, ignore_regions=True, progress=False)
    assert len(calls) == 6 and (tmp_path / "images" / "train" / "000001.png").exists()


def test_interrupted_write_leaves_no_json_and_resumes(tmp_path, monkeypatch):
    real = synth.generate_image
    calls, fail_at = [], [3]

    class Interrupted(Exception):
        pass

    def flaky(seed, size, ignore_regions=False):
        calls.append(seed)
        if len(calls) == fail_at[0]:
            raise Interrupted("simulated interruption")
        return real(seed, size, ignore_regions)

    monkeypatch.setattr(synth, "generate_image", flaky)
    with pytest.raises(Interrupted):
        synth.write_split(tmp_path / "x", "train", 5, 64, progress=False)
    assert not synth.annotation_path(tmp_path / "x", "train").exists()
    assert not (tmp_path / "x" / "images" / "train").exists()
    calls.clear()
    fail_at[0] = -1
    p = synth.write_split(tmp_path / "x", "train", 5, 64, progress=False)  # resumes: 2 images were done
    assert len(calls) == 3
    monkeypatch.setattr(synth, "generate_image", real)
    fresh = synth.write_split(tmp_path / "y", "train", 5, 64, progress=False)
    assert p.read_bytes() == fresh.read_bytes()
    assert _png_bytes(tmp_path / "x", "train") == _png_bytes(tmp_path / "y", "train")

    # interrupting a regeneration keeps the previous complete split usable
    monkeypatch.setattr(synth, "generate_image", flaky)
    calls.clear()
    fail_at[0] = 2
    with pytest.raises(Interrupted):
        synth.write_split(tmp_path / "x", "train", 5, 72, progress=False)
    old = _read(p)
    assert old["info"]["size"] == 64
    assert all((tmp_path / "x" / "images" / "train" / im["file_name"]).exists() for im in old["images"])


def test_plot_stats_and_box_stats(tmp_path):
    p_train = synth.write_split(tmp_path, "train", 4, 96, progress=False)
    p_val = synth.write_split(tmp_path, "val", 2, 96, progress=False)
    coco = [_read(p_train), _read(p_val)]
    df = datastats.box_stats(p_train)
    assert list(df.columns) == ["image_id", "category", "w", "h", "area", "sqrt_area"]
    assert len(df) == len(coco[0]["annotations"]) and set(df["category"]) <= set(synth.CLASSES)
    np.testing.assert_allclose(df["sqrt_area"] ** 2, df["w"] * df["h"])

    out = tmp_path / "figs" / "stats.png"
    summary = datastats.plot_stats(tmp_path, out)  # a dataset folder: both splits
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    boxes = [a for c in coco for a in c["annotations"]]
    s = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in boxes])
    assert summary["num_images"] == 6 and summary["num_boxes"] == len(boxes)
    assert summary["frac_under_16"] == pytest.approx((s < 16).mean())
    assert summary["frac_under_32"] == pytest.approx((s < 32).mean())
    per_image = [sum(a["image_id"] == im["id"] for a in c["annotations"]) for c in coco for im in c["images"]]
    assert summary["mean_per_image"] == pytest.approx(np.mean(per_image))
    assert summary["max_per_image"] == max(per_image)
    assert sum(summary["per_class"].values()) == len(boxes) and set(summary["per_class"]) == set(
        synth.CLASSES
    )
    assert datastats.plot_stats([p_val], tmp_path / "val.png")["num_images"] == 2
    text = datastats.format_stats(summary)
    assert "16²" in text and str(summary["num_boxes"]) in text


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthsod_never_overwrites_a_dataset_it_did_not_write(tmp_path):
    """A COCO folder given as SynthSOD's root (no --set data.dataset=coco) is refused and left
    byte-identical."""
    import json

    from sodlib.data.synth import ensure_split, write_split

    root = tmp_path / "my_coco"
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "images" / "train" / "photo.jpg").write_bytes(b"\xff\xd8 my photo")
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps(
            {"info": {"description": "my drone survey"}, "images": [], "annotations": [], "categories": []}
        )
    )
    before = _snapshot(root)
    for call in (
        lambda: write_split(root, "train", 2, 64, progress=False),
        lambda: ensure_split(root, "train", 2, 64, progress=False),
    ):
        with pytest.raises(ValueError, match=r"my_coco.*SynthSOD did not write them.*data\.dataset=coco"):
            call()
        assert _snapshot(root) == before
    # an image folder alone (no json) is the user's too
    only_images = tmp_path / "only_images"
    (only_images / "images" / "val").mkdir(parents=True)
    (only_images / "images" / "val" / "a.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="only_images"):
        write_split(only_images, "val", 1, 64, progress=False)
    assert (only_images / "images" / "val" / "a.png").read_bytes() == b"png"


def test_synthsod_rewrites_its_own_splits(tmp_path):
    from sodlib.data.synth import OWNER_MARK, write_split

    write_split(tmp_path, "val", 2, 64, progress=False)
    assert (tmp_path / "images" / "val" / OWNER_MARK).exists()
    write_split(tmp_path, "val", 3, 64, progress=False)  # ours: regenerated
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 3
    # a write interrupted after the json was removed: the marked folder is still recognised as ours
    (tmp_path / "annotations" / "instances_val.json").unlink()
    write_split(tmp_path, "val", 2, 64, progress=False)
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 2


def test_train_cli_refuses_a_foreign_folder_as_synthsod(tmp_path, capsys):
    import json

    from sodlib.cli import main

    root = tmp_path / "coco"
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps({"images": [], "annotations": []}))
    before = _snapshot(root)
    assert main(["train", "--profile", "smoke", "--data", str(root), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "SynthSOD did not write them" in err and "Traceback" not in err
    assert _snapshot(root) == before


def _ensure_in_child(out_dir: str, start) -> str:
    start.wait()
    return str(synth.ensure_split(out_dir, "train", 24, 64, progress=False))


def test_ensure_split_from_two_processes_at_once_generates_one_complete_split(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        start = manager.Barrier(2)
        paths = [f.result() for f in [pool.submit(_ensure_in_child, str(tmp_path), start) for _ in range(2)]]
    assert paths[0] == paths[1]
    coco = json.loads(Path(paths[0]).read_text())
    assert len(coco["images"]) == 24
    assert sorted(p.name for p in (tmp_path / "images" / "train").glob("*.png")) == [
        f"{i:06d}.png" for i in range(24)
    ]
    assert not list((tmp_path / "images").glob(".*")) and not list((tmp_path / "annotations").glob(".*"))


def _tree_digest(root: Path) -> dict:
    import hashlib

    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_regenerating_never_deletes_a_file_synthsod_did_not_write(tmp_path):
    synth.write_split(tmp_path, "train", 2, 64, progress=False)
    note = tmp_path / "images" / "train" / "my_notes.txt"
    note.write_text("mine")
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"my_notes.txt: SynthSOD did not write this file"):
        synth.write_split(tmp_path, "train", 3, 64, progress=False)  # a new size would replace the folder
    with pytest.raises(ValueError, match=r"my_notes.txt: SynthSOD did not write this file"):
        synth.ensure_split(tmp_path, "train", 3, 64, progress=False)
    assert _tree_digest(tmp_path) == before
    # a SynthSOD json copied beside someone's photos does not make them SynthSOD's
    theirs = tmp_path / "theirs"
    (theirs / "images" / "train").mkdir(parents=True)
    (theirs / "images" / "train" / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (theirs / "annotations").mkdir()
    (theirs / "annotations" / "instances_train.json").write_bytes(
        synth.annotation_path(tmp_path, "train").read_bytes()
    )
    before = _tree_digest(theirs)
    with pytest.raises(ValueError, match="holiday.jpg: SynthSOD did not write this file"):
        synth.write_split(theirs, "train", 2, 64, progress=False)
    assert _tree_digest(theirs) == before


def test_a_file_named_like_synthsods_but_not_in_its_json_is_the_users(tmp_path):
    synth.write_split(tmp_path, "train", 2, 64, progress=False)
    extra = tmp_path / "images" / "train" / "000007.png"  # SynthSOD's naming, not in its json: someone else's
    extra.write_bytes(b"their image")
    with pytest.raises(ValueError, match="000007.png: SynthSOD did not write this file"):
        synth.write_split(tmp_path, "train", 3, 64, progress=False)
    assert extra.read_bytes() == b"their image"
