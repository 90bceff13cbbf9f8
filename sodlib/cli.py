"""The ``sodlib`` command: train, eval, predict, data, bench, reproduce.

Each sub-command is a thin argparse front over a library function; heavy imports happen inside
the handlers so ``sodlib --help`` is instant. Errors raised by the library (and a failed reproduction
step, e.g. a notebook cell) are printed as one line and give exit status 2 (no traceback unless
``SODLIB_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path


def _cmd_data_synth(args) -> int:
    from sodlib.data import synth

    path = synth.write_split(
        args.out, args.split, args.num_images, args.size, seed=args.seed, ignore_regions=args.ignore_regions
    )
    print(f"wrote {args.num_images} {args.split} images and {path}")
    return 0


def _cmd_data_stats(args) -> int:
    from sodlib.data import datastats

    out_png = Path(args.out) if args.out else _results() / "figures" / "synthsod_stats.png"
    if args.out and out_png.exists():  # a file the user names is theirs: never replaced (the default is ours)
        raise FileExistsError(f"{out_png} exists; choose another --out (data stats never overwrites a file)")
    summary = datastats.plot_stats(args.dirs, out_png)
    print(datastats.format_stats(summary))
    print(f"figure: {out_png}")
    return 0


def _config(args):
    from sodlib.config import get_profile, override

    return override(get_profile(args.profile), *args.set)


def _cmd_train(args) -> int:
    import json

    from sodlib.io import claim_output_dir
    from sodlib.training.engine import train
    from sodlib.training.runs import run_dir

    cfg = _config(args)
    if args.init_from:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(args.init_from)))
    out = Path(args.out) if args.out else run_dir(cfg)
    if args.out:  # new, empty, sodlib's own, or a run folder to resume
        claim_output_dir(out, resumable=("config.json", "checkpoints"))
    args.run_dir = out  # named by the Ctrl-C message
    print(f"run folder: {out}")
    metrics = train(cfg, out, data_root=args.data, resume=not args.no_resume, protocol=args.protocol)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from sodlib.inference.predict import predict_files

    _out_folder(args.out)
    path = predict_files(
        args.checkpoint,
        args.images,
        args.out,
        device=args.device,
        slice_size=args.slice,
        overlap=args.overlap,
        score_thr=args.score_thr,
    )
    print(f"wrote {path} and {len(args.images)} drawn image(s)")
    return 0


def _out_folder(path) -> None:
    """An explicit ``--out`` folder: new, empty, or sodlib's own (:func:`sodlib.io.claim_output_dir`)."""
    if path is not None:
        from sodlib.io import claim_output_dir

        claim_output_dir(path)


def _cmd_eval(args) -> int:
    from sodlib.evaluation import protocols as evaluation
    from sodlib.io import claim_output_dir

    # one rule for --out and the default folder beside the checkpoint's run or the detections: checked
    # before any work
    out_dir = claim_output_dir(args.out) if args.out else None
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        default = Path(args.checkpoint).resolve().parent.parent / f"eval_{args.protocol}"
    elif args.gt is None or args.dets is None:
        raise ValueError("sodlib eval needs --checkpoint, or --gt and --dets")
    else:
        for flag, path in (("--gt", args.gt), ("--dets", args.dets)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")
        default = Path(args.dets).resolve().parent / f"eval_{args.protocol}"
    out_dir = out_dir or claim_output_dir(default, "the output folder")
    if args.checkpoint:
        from sodlib.data.datasets import build_dataset
        from sodlib.inference.predict import evaluate_model, load_model
        from sodlib.io import atomic_write_json

        model, cfg = load_model(args.checkpoint, args.device)
        ds = build_dataset(cfg.data, args.split or cfg.data.val_split, train=False, data_root=args.data)
        _, dets = evaluate_model(model, ds, protocol=args.protocol, device=args.device, num_top=args.num_top)
        args.gt, args.dets = ds.coco, atomic_write_json(out_dir / "detections.json", dets, indent=None)
    metrics, per_class = evaluation.evaluate_detailed(
        args.gt, args.dets, protocol=args.protocol, backend=args.backend
    )
    evaluation.write_metrics(out_dir, metrics, per_class)
    print(evaluation.format_table(metrics, per_class))
    print(f"metrics: {out_dir / 'metrics.csv'}")
    return 0


def _cmd_bench(args) -> int:
    from sodlib.studies import bench

    _out_folder(args.out)
    path = bench.run(args.what, out_dir=Path(args.out) if args.out else _results() / "bench")
    print(f"wrote {path}")
    return 0


def _cmd_heatmap(args) -> int:
    from sodlib.inference.heatmaps import heatmap_files

    paths = heatmap_files(
        args.checkpoint,
        args.images,
        args.out,
        layer=args.layer,
        objects=args.objects,
        box=args.box,
        slice_size=args.slice,
        overlap=args.overlap,
    )
    print(f"wrote {len(paths)} figure(s) to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from sodlib.inference.export import export_checkpoint

    path = export_checkpoint(
        args.checkpoint,
        args.out,
        image_size=args.image_size,
        postprocess=args.postprocess,
        num_top=args.num_top,
        rtdetr_depth=args.rtdetr,
        num_classes=args.num_classes,
    )
    print(f"wrote {path}")
    return 0


def _cmd_reproduce(args) -> int:
    from sodlib.studies import reproduce

    try:
        return reproduce.main(
            profile=args.profile,
            only=args.only,
            seeds=args.seeds,
            results_dir=Path(args.out) if args.out else _results(),
            data=args.data or "",
            device=args.device or "",
            train_missing=args.train_missing,
            tables=args.tables,
            rows=args.rows,
        )
    except reproduce.ReproductionError as exc:  # a step failed: one line (step, notebook, cell), exit 2
        if os.environ.get("SODLIB_DEBUG"):
            raise
        print(f"sodlib reproduce: error: {exc}", file=sys.stderr)
        return 2


def _cmd_compare(args) -> int:
    from sodlib.studies import compare

    return compare.report(compare.compare(args.results or _results(), args.rev))


def _results() -> Path:
    from sodlib.training.runs import default_results_dir

    return default_results_dir()


def build_parser() -> argparse.ArgumentParser:
    """The ``sodlib`` parser: each ``_add_<command>_parser`` adds one sub-command and names its handler."""
    p = argparse.ArgumentParser(prog="sodlib", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_predict_parser(sub)
    _add_eval_parser(sub)
    _add_heatmap_parser(sub)
    _add_export_parser(sub)
    _add_bench_parser(sub)
    _add_reproduce_parser(sub)
    _add_compare_parser(sub)
    return p


def _add_data_parser(sub) -> None:
    """``sodlib data synth`` and ``sodlib data stats``."""
    data = sub.add_parser("data", help="generate SynthSOD, dataset statistics")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a SynthSOD split as PNG + COCO json")
    s.add_argument("--out", required=True, help="dataset folder (images/<split>/, annotations/)")
    s.add_argument("--split", default="train", choices=("train", "val"))
    s.add_argument("--num-images", type=int, default=512)
    s.add_argument("--size", type=int, default=320, help="square image size in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ignore-regions", action="store_true", help="add crowd/ignore regions")
    s.set_defaults(func=_cmd_data_synth)
    st = dsub.add_parser("stats", help="box-size and objects-per-image histograms")
    st.add_argument("dirs", nargs="+", help="COCO json files or dataset folders")
    st.add_argument("--out", default=None, help="PNG path (default results/figures/synthsod_stats.png)")
    st.set_defaults(func=_cmd_data_stats)


def _add_train_parser(sub) -> None:
    """``sodlib train``."""
    t = sub.add_parser("train", help="train a detector (torchrun for several processes)")
    _add_config_args(t)
    t.add_argument("--data", default=None, help="dataset root (overrides data.root)")
    t.add_argument("--out", default=None, help="run folder (default results/runs/<config hash>)")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="fine-tune: start from the tensors of CKPT (RT-DETR, transformers or sodlib checkpoint) "
        "whose name and shape fit; same as --set train.init_from=CKPT",
    )
    t.add_argument("--protocol", default="coco", choices=("coco", "sodad", "visdrone"))
    t.set_defaults(func=_cmd_train)


def _add_predict_parser(sub) -> None:
    """``sodlib predict``."""
    pr = sub.add_parser("predict", help="detect objects in image files")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--out", required=True, help="folder for predictions.json and drawn PNGs")
    pr.add_argument("--slice", type=int, default=None, help="sliced inference window in pixels, e.g. 640")
    pr.add_argument("--overlap", type=float, default=0.2, help="window overlap as a fraction of --slice")
    pr.add_argument("--score-thr", type=float, default=0.3, help="score threshold for the drawn boxes")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=_cmd_predict)


def _add_eval_parser(sub) -> None:
    """``sodlib eval``."""
    e = sub.add_parser("eval", help="evaluate a checkpoint, or COCO-format detections against ground truth")
    e.add_argument("--checkpoint", help="checkpoint to evaluate on its validation split")
    e.add_argument("--data", default=None, help="with --checkpoint: dataset root")
    e.add_argument("--split", default=None, help="with --checkpoint: split (default data.val_split)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--gt", help="COCO ground-truth json")
    e.add_argument("--dets", help="COCO results json")
    e.add_argument("--protocol", default="coco", choices=("coco", "sodad", "visdrone"))
    e.add_argument("--backend", default="auto", choices=("auto", "pycocotools", "faster"))
    e.add_argument(
        "--num-top",
        type=int,
        default=None,
        help="with --checkpoint: detections kept per image (default: coco 100, sodad 300, "
        "visdrone 500; RT-DETR's own evaluation keeps 300)",
    )
    e.add_argument("--out", default=None, help="folder for metrics.csv / per_class.csv")
    e.set_defaults(func=_cmd_eval)


def _add_heatmap_parser(sub) -> None:
    """``sodlib heatmap``."""
    hm = sub.add_parser("heatmap", help="decoder attention of chosen objects, one figure per image")
    hm.add_argument("images", nargs="+")
    hm.add_argument("--checkpoint", required=True)
    hm.add_argument("--out", required=True, help="folder for <image stem>_heatmap.png")
    hm.add_argument("--layer", default="all", help="decoder layer 1..L, or all (default)")
    pick = hm.add_mutually_exclusive_group()
    pick.add_argument("--objects", type=int, default=3, help="the N best-scoring detections (default 3)")
    pick.add_argument(
        "--box", default=None, metavar="x,y,w,h", help="the query that best covers this box (px)"
    )
    hm.add_argument(
        "--slice", type=int, default=None, help="run on overlapping windows of this size (large images)"
    )
    hm.add_argument("--overlap", type=float, default=0.2)
    hm.set_defaults(func=_cmd_heatmap)


def _add_export_parser(sub) -> None:
    """``sodlib export``."""
    x = sub.add_parser(
        "export", help="export a checkpoint's detector to ONNX (onnxruntime-checked in the tests)"
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="sodlib checkpoint (results/runs/<hash>/checkpoints/last.pt), or a released one with --rtdetr",
    )
    x.add_argument("--out", required=True, help="the .onnx file to write (must not exist)")
    x.add_argument("--image-size", type=int, default=None, help="square input size (default: the run's)")
    x.add_argument(
        "--postprocess",
        action="store_true",
        help="add RT-DETR's post-processor: input orig_target_sizes (w, h), outputs labels/boxes/scores",
    )
    x.add_argument("--num-top", type=int, default=300, help="detections per image with --postprocess")
    x.add_argument(
        "--rtdetr",
        type=int,
        choices=(18, 34, 50, 101),
        default=None,
        help="the checkpoint is a released RT-DETR-R<depth> (RT-DETR's or transformers' layout)",
    )
    x.add_argument("--num-classes", type=int, default=80, help="its class count with --rtdetr (COCO: 80)")
    x.set_defaults(func=_cmd_export)


def _add_bench_parser(sub) -> None:
    """``sodlib bench``."""
    b = sub.add_parser("bench", help="benchmarks writing results/bench/<what>.csv")
    b.add_argument("what", choices=("data", "gpu", "model", "methods", "mrqm", "sahi"))
    b.add_argument("--out", default=None)
    b.set_defaults(func=_cmd_bench)


def _add_reproduce_parser(sub) -> None:
    """``sodlib reproduce``."""
    r = sub.add_parser("reproduce", help="regenerate results/ headlessly")
    r.add_argument("--profile", default="cpu", choices=("smoke", "cpu", "paper"))
    r.add_argument(
        "--only",
        default=None,
        help="run only the steps whose name starts with this (00_data, 00_baseline, NN_<notebook>), e.g. 01",
    )
    r.add_argument(
        "--seeds", type=int, default=None, help="seeds for multi-seed tables (notebook parameter SEEDS)"
    )
    r.add_argument(
        "--data", default=None, help="dataset root for the notebooks (DATA; default: the profile's)"
    )
    r.add_argument("--device", default=None, help="device for the notebooks (DEVICE; default: the profile's)")
    r.add_argument("--out", default=None, help="results folder (default: the repository's results/)")
    r.add_argument(
        "--train-missing",
        action="store_true",
        help="notebook 04 trains the ablation runs the run cache lacks (hours on a CPU; "
        "with a fresh --out: all)",
    )
    r.add_argument(
        "--tables",
        default="",
        help="with --train-missing: only these tables, comma-separated (table3,table7)",
    )
    r.add_argument(
        "--rows", default="", help="with --train-missing: only these rows, '|'-separated labels (SR|SPR)"
    )
    r.set_defaults(func=_cmd_reproduce)


def _add_compare_parser(sub) -> None:
    """``sodlib compare``."""
    c = sub.add_parser(
        "compare", help="after `sodlib reproduce`: which files under results/ differ from git, and how"
    )
    c.add_argument(
        "--results", default=None, help="results folder inside a git checkout (default: the repository's)"
    )
    c.add_argument("--rev", default="HEAD", help="the revision holding the committed results (default HEAD)")
    c.set_defaults(func=_cmd_compare)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from sodlib.config import PROFILES

    p.add_argument("--profile", default="cpu", choices=tuple(PROFILES))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set loss.st=true (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # the error boundary: whatever the user can cause ends in one line and a non-zero exit (2; 130 for
    # Ctrl-C); SODLIB_DEBUG=1 shows the traceback. Library code raises typed exceptions.
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("SODLIB_DEBUG"):
            raise
        run = getattr(args, "run_dir", None)
        ckpt = Path(run) / "checkpoints" if run else None
        hint = (
            ""
            if ckpt is None
            else f"; the last checkpoint is in {ckpt} — run the same command to resume"
            if ckpt.is_dir()
            else "; no checkpoint was written yet — the same command starts the run again"
        )
        print(f"sodlib {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SODLIB_DEBUG"):
            raise
        kind = (
            ""
            if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError))
            else f"{type(exc).__name__}: "
        )
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"sodlib {args.command}: error: {kind}{text} (SODLIB_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
