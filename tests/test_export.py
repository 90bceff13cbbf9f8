"""ONNX export: onnxruntime outputs equal PyTorch's, RT-DETR's post-processor, paper A's training-only
claim."""

import pytest
import torch

from sodlib.build import build_detector
from sodlib.checkpoints import save_checkpoint
from sodlib.cli import main
from sodlib.config import get_profile, override
from sodlib.models.detector import postprocess

ort = pytest.importorskip("onnxruntime")
from sodlib.inference.export import check_onnx, export_onnx, graph_signature, match_queries


def _checkpoint(path, *sets, seed=0):
    cfg = override(get_profile("cpu"), *sets)
    torch.manual_seed(seed)
    model = build_detector(cfg.model)
    with torch.no_grad():  # move the class scores off the 1% prior so that the outputs are not near-constant
        for p in model.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(path, model=model.state_dict(), config=cfg.to_dict())
    return path, model.eval()


def test_match_queries_ignores_the_order_of_queries():
    logits, boxes = torch.randn(2, 5, 3).numpy(), torch.rand(2, 5, 4).numpy()
    assert match_queries(logits, boxes, logits[:, ::-1], boxes[:, ::-1]) == 0.0
    moved = boxes.copy()
    moved[1, 2, 0] += 0.5
    assert match_queries(logits, boxes, logits, moved) == pytest.approx(0.5)


@pytest.mark.slow
def test_export_equals_pytorch_at_batch_1_and_3(tmp_path):
    ckpt, model = _checkpoint(tmp_path / "last.pt")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path), "--image-size", "160"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    torch.manual_seed(1)
    for batch in (1, 3):
        assert check_onnx(onnx_path, model, torch.rand(batch, 3, 160, 160)) < 1e-4
    # nothing is overwritten; a bad or missing checkpoint leaves no file behind
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_path)]) == 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02garbage")
    for bad in (junk, tmp_path / "missing.pt"):
        out = tmp_path / f"{bad.stem}.onnx"
        assert main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 2
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


@pytest.mark.slow
def test_postprocessed_export_equals_rtdetr_style_postprocess(tmp_path):
    _, model = _checkpoint(tmp_path / "last.pt")
    path = export_onnx(model, tmp_path / "pp.onnx", image_size=128, postprocess=True, num_top=50)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 128, 128)
    sizes_wh = torch.tensor([[640, 480], [128, 256]])
    labels, boxes, scores = session.run(
        None, {"images": images.numpy(), "orig_target_sizes": sizes_wh.numpy()}
    )
    assert labels.shape == (2, 50) and boxes.shape == (2, 50, 4) and scores.shape == (2, 50)
    with torch.no_grad():
        expected = postprocess(model(images), sizes_wh.flip(-1), num_top=50)
    for i, det in enumerate(expected):
        torch.testing.assert_close(torch.from_numpy(scores[i]), det["scores"], atol=1e-5, rtol=1e-5)
        # boxes of equal score may come in either order: compare them as sorted sets
        got = torch.from_numpy(boxes[i]).sort(0).values
        torch.testing.assert_close(got, det["boxes_xyxy"].sort(0).values, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_paper_a_methods_export_to_the_baseline_graph(tmp_path):
    """ST, SR and SPR change training only: the deployed graph has the same operators and parameters."""
    base, _ = _checkpoint(tmp_path / "base.pt")
    full, _ = _checkpoint(tmp_path / "full.pt", "loss.st=true", "loss.sr=true", "loss.spr=true", seed=1)
    paths = []
    for ckpt in (base, full):
        out = tmp_path / f"{ckpt.stem}.onnx"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--image-size", "128"]) == 0
        paths.append(out)
    (ops_a, params_a), (ops_b, params_b) = graph_signature(paths[0]), graph_signature(paths[1])
    assert ops_a == ops_b and params_a == params_b
    assert "GridSample" in ops_a and "TopK" in ops_a


@pytest.mark.slow
def test_export_a_released_rtdetr_checkpoint(tmp_path):
    from sodlib.official import load_rtdetr, rtdetr_model_config, to_layout

    cfg = rtdetr_model_config(18, num_classes=3)
    model = build_detector(cfg)
    ckpt = tmp_path / "rtdetr_r18.pth"
    torch.save({"ema": {"module": to_layout(model, "official")}}, ckpt)
    out = tmp_path / "r18.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--rtdetr",
                "18",
                "--num-classes",
                "3",
                "--out",
                str(out),
                "--image-size",
                "128",
            ]
        )
        == 0
    )
    assert check_onnx(out, load_rtdetr(ckpt, cfg), torch.rand(2, 3, 128, 128)) < 1e-4
    # without --rtdetr a released checkpoint is not a sodlib one: one line, no file
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_num_top_and_image_size_out_of_range_are_refused_before_export(smoke_detector, tmp_path):
    model, cfg = smoke_detector
    pairs = cfg.model.num_queries * cfg.model.num_classes
    for num_top in (0, pairs + 1):
        with pytest.raises(ValueError, match=rf"--num-top must be from 1 to {pairs} .*got {num_top}"):
            export_onnx(model, tmp_path / "x.onnx", image_size=128, postprocess=True, num_top=num_top)
    with pytest.raises(
        ValueError, match=r"--image-size must be a multiple of 32 .* from 32 to 4096, got 100000"
    ):
        export_onnx(model, tmp_path / "x.onnx", image_size=100000)
    assert not list(tmp_path.iterdir())
