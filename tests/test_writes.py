"""Every command that writes, given an --out that holds a user's file or folder, refuses or writes only what
it names: no file it did not create is deleted or replaced."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sodlib.cli import main
from sodlib.config import get_profile, override
from sodlib.training.engine import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_run")
    train(
        override(get_profile("smoke"), "train.max_iters=2", "train.checkpoint_every=2"), out, progress=False
    )
    return out / "checkpoints" / "last.pt"


def _digest(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _commands(tmp_path, checkpoint, out):
    image = tmp_path / "img.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(image)
    gt = {
        "images": [{"id": 1, "file_name": "img.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "score": 0.9}])
    )
    return {
        "predict": ["predict", str(image), "--checkpoint", str(checkpoint), "--out", out],
        "heatmap": ["heatmap", str(image), "--checkpoint", str(checkpoint), "--out", out],
        "eval": [
            "eval",
            "--gt",
            str(tmp_path / "gt.json"),
            "--dets",
            str(tmp_path / "dets.json"),
            "--out",
            out,
        ],
        "export": ["export", "--checkpoint", str(checkpoint), "--out", out],
        "bench": ["bench", "data", "--out", out],
        "data stats": ["data", "stats", str(tmp_path / "gt.json"), "--out", out],
        "data synth": ["data", "synth", "--out", out, "--split", "val", "--num-images", "2", "--size", "64"],
        "train": ["train", "--profile", "smoke", "--set", "train.max_iters=1", "--out", out],
    }


@pytest.mark.parametrize(
    "command", ["predict", "heatmap", "eval", "export", "bench", "data stats", "data synth", "train"]
)
@pytest.mark.parametrize("theirs", ["folder", "file"])
def test_a_users_files_survive_every_writing_command(command, theirs, checkpoint, tmp_path):
    user = tmp_path / "user"
    if (
        theirs == "folder"
    ):  # a folder of theirs, with files named as the commands name theirs, and a sub-folder
        (user / "sub").mkdir(parents=True)
        for name in (
            "mine.txt",
            "metrics.csv",
            "per_class.csv",
            "predictions.json",
            "data.csv",
            "log.csv",
            "img_pred.png",
            "img_heatmap.png",
        ):
            (user / name).write_text(f"my {name}")
        (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    else:  # a file of theirs where the output would go
        user.parent.mkdir(parents=True, exist_ok=True)
        user.write_text("my file")
    root = user if theirs == "folder" else user.parent
    before = _digest(root)
    code = main(_commands(tmp_path, checkpoint, str(user))[command])
    after = _digest(root)
    assert all(after.get(path) == digest for path, digest in before.items()), (command, code)
    if code != 0:
        assert code == 2
