import json

import numpy as np
import pytest
import torch
from PIL import Image

from sodlib.cli import main
from sodlib.config import get_profile, override
from sodlib.inference.predict import load_model, predict_image, read_image_rgb
from sodlib.training.engine import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_run")
    cfg = override(
        get_profile("smoke"),
        "train.max_iters=2",
        "train.checkpoint_every=2",
        "train.ema_decay=0.9",
        "train.ema_warmups=1",
    )
    train(cfg, out, progress=False)
    return out / "checkpoints" / "last.pt"


def test_load_model_restores_ema_weights_and_categories(checkpoint):
    model, cfg, cats = load_model(checkpoint, with_categories=True)
    assert cfg.name == "smoke" and not model.training
    assert [c["id"] for c in cats] == list(range(1, 7))
    state = torch.load(checkpoint, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state["ema"]["module"][k])


def test_sliced_prediction_maps_windows_back(checkpoint):
    model, cfg = load_model(checkpoint)
    size = cfg.data.image_size
    img = (torch.rand(3, size, size) * 255).to(torch.uint8)
    whole = predict_image(model, img, size)
    same = predict_image(model, img, size, slice_size=size)  # one window: identical to unsliced
    torch.testing.assert_close(whole["boxes_xyxy"], same["boxes_xyxy"])
    big = torch.cat([img, img], dim=2)  # two windows side by side
    sliced = predict_image(model, big, size, slice_size=size, overlap=0.0, num_top=1000, nms_iou=1.0)
    right = sliced["boxes_xyxy"][sliced["boxes_xyxy"][:, 0] >= size]
    assert len(right) > 0 and right[:, 2].max() <= 2 * size + 1e-3


def test_predict_and_eval_commands(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(300, 200), (128, 128)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "pred"
    assert (
        main(["predict", *paths, "--checkpoint", str(checkpoint), "--out", str(out), "--slice", "128"]) == 0
    )
    pred = json.loads((out / "predictions.json").read_text())
    assert [im["width"] for im in pred["images"]] == [300, 128]
    assert {d["image_id"] for d in pred["detections"]} <= {1, 2}
    assert (out / "img0_pred.png").exists() and (out / "img1_pred.png").exists()
    assert (
        main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint), "--out", str(out)])
        == 2
    )

    ev = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "coco", "--out", str(ev)]) == 0
    assert (ev / "metrics.csv").exists() and (ev / "detections.json").exists()
    per_image = np.bincount([d["image_id"] for d in json.loads((ev / "detections.json").read_text())])
    assert set(per_image[per_image > 0]) == {100}  # coco: the 100 best (query, class) pairs per image
    ev300 = tmp_path / "ev300"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--protocol",
                "coco",
                "--num-top",
                "300",
                "--out",
                str(ev300),
            ]
        )
        == 0
    )
    per_image = np.bincount([d["image_id"] for d in json.loads((ev300 / "detections.json").read_text())])
    assert set(per_image[per_image > 0]) == {30 * 6}  # smoke: 30 queries x 6 classes < 300, all kept
    assert main(["eval", "--checkpoint", str(checkpoint), "--num-top", "0", "--out", str(ev300)]) == 2


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image_rgb(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        read_image_rgb(bad)
    with pytest.raises(ValueError, match="is a folder; give the image files"):
        read_image_rgb(tmp_path)


def test_predict_keeps_one_drawing_per_input_even_with_equal_names(checkpoint, tmp_path):
    from sodlib.inference.predict import output_names

    assert output_names(["a/x.png", "b/x.png", "c/y.jpg", "d/x.jpg"], "_pred.png") == [
        "x_pred.png",
        "x_2_pred.png",
        "y_pred.png",
        "x_3_pred.png",
    ]
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((64, 64, 3), 40 * len(paths), dtype=np.uint8)).save(
            tmp_path / folder / "x.png"
        )
        paths.append(str(tmp_path / folder / "x.png"))
    out = tmp_path / "pred"
    assert main(["predict", *paths, "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["x_2_pred.png", "x_pred.png"]


def test_output_names_stay_unique_when_an_input_has_a_disambiguated_name():
    from sodlib.inference.predict import output_names

    names = output_names(["a/x.png", "b/x.png", "c/x_2.png"], "_pred.png")
    assert names == ["x_pred.png", "x_2_pred.png", "x_2_2_pred.png"] and len(set(names)) == 3


def test_a_16_bit_image_reads_as_training_reads_it(tmp_path):
    from sodlib.data.datasets import rgb8

    grey = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 60).astype(np.uint16)  # up to 61380
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = read_image_rgb(tmp_path / "g16.png")
    assert (
        image.dtype == torch.uint8 and int(image.max()) == 61380 >> 8
    )  # 239, not clipped or 257x too bright
    with Image.open(tmp_path / "g16.png") as im:
        assert np.array_equal(np.asarray(rgb8(im)).transpose(2, 0, 1), image.numpy())
    assert np.array_equal(image[0].numpy(), (grey >> 8).astype(np.uint8))


def test_predict_checks_every_image_before_writing_anything(checkpoint, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    assert (
        main(["predict", str(good), str(good), str(bad), "--checkpoint", str(checkpoint), "--out", str(out)])
        == 2
    )
    assert "bad.png" in capsys.readouterr().err
    assert not list(out.glob("*.png")) and not (out / "predictions.json").exists()


def test_a_window_smaller_than_the_model_can_use_is_refused(smoke_detector):
    from sodlib.inference.predict import MIN_SLICE_PX, predict_image

    model, cfg = smoke_detector
    image = torch.zeros(3, 128, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"--slice 1: a window must be at least {MIN_SLICE_PX} px"):
        predict_image(model, image, cfg.data.image_size, slice_size=1)
    assert predict_image(model, image, cfg.data.image_size, slice_size=MIN_SLICE_PX)["scores"].ndim == 1


def test_an_animated_image_gives_its_first_frame_and_says_so(tmp_path):
    frames = [Image.fromarray(np.full((16, 24, 3), v, dtype=np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r"anim.gif: 2 frames; the first is used"):
        image = read_image_rgb(tmp_path / "anim.gif")
    assert image.shape == (3, 16, 24)
    with Image.open(tmp_path / "anim.gif") as im:  # training's reader: PIL's first frame
        assert np.array_equal(np.asarray(im.convert("RGB")).transpose(2, 0, 1), image.numpy())
