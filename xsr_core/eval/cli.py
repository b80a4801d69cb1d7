"""``python -m xsr_core.eval``: ``metrics`` (Table-1 metrics of an SR folder) and ``run`` (batch x16
inference; implemented in ``xsr_core.eval.run``, imported only when used)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from ..cli_common import error_status, options
from .metrics import METRICS, MetricInputError, MissingWeightsError


def _add_metrics_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "metrics",
        help="FID, DISTS, LPIPS, CLIP-Score, MANIQA, MUSIQ (+PSNR, SSIM) of SR images vs HR images",
        description=(
            "Compute the paper's Table-1 metrics of SR images against same-named HR images and print "
            "a markdown table beside the paper's rows. Weights are never downloaded: they come from "
            "--weights-dir or the torch hub / pyiqa / Hugging Face caches."
        ),
    )
    p.add_argument("--sr", required=True, help="folder of SR outputs (recursive; paired by relative name)")
    p.add_argument(
        "--hr",
        help="folder of HR ground-truth images (any size: a square SR is scored against the x16 "
        "crop of its HR, never a squash); default for an `eval run` folder: its saved SR_DIR/hr_crop",
    )
    p.add_argument(
        "--captions",
        help="the SR images' text conditions for CLIP-Score (CLIP-T): .json {name: caption}, "
        ".jsonl, or name<TAB>caption lines; default for an `eval run` folder: its captions.jsonl",
    )
    p.add_argument("--out", help="folder for metrics.json and metrics.md (default: print only)")
    p.add_argument(
        "--metrics",
        help=f"comma list from: {', '.join(METRICS)} (default: fid,dists,lpips,clip_i,maniqa,musiq,psnr,ssim"
        " + clip_t with --captions)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda, cuda:1, cpu (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--weights-dir", help="folder searched first for weight files (see the error message for names)")
    p.add_argument("--resize-hr", action="store_true", help=argparse.SUPPRESS)  # removed: gives a clear error
    p.add_argument(
        "--skip-unmatched", action="store_true", help="leave out images present in only one folder instead of failing"
    )
    p.add_argument(
        "--allow-unexcluded-db",
        action="store_true",
        help="score an `eval run` folder made with a reference DB not deduplicated against its test images",
    )
    p.add_argument("--label", help="name of this run's row in the table")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress; show the traceback of an error")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error instead of one line")
    p.set_defaults(handler=_run_metrics)


def _run_metrics(args: argparse.Namespace) -> int:
    from .metrics import compute_metrics, write_results
    from .paper import format_table

    try:
        results = compute_metrics(
            args.sr,
            args.hr,
            **options(
                args, "metrics captions device weights_dir batch_size resize_hr skip_unmatched allow_unexcluded_db"
            ),
        )
    except (MissingWeightsError, MetricInputError, ValueError, OSError) as exc:
        if args.verbose or args.traceback:
            raise
        return error_status(exc, "xsr eval metrics")
    if args.out:
        json_path, md_path = write_results(results, args.out, label=args.label)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, label=args.label))
    return 0


def _add_table_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table",
        help="several metrics.json files as rows of one table (e.g. text-only base and full AdaIN, Table 1)",
        description="Render metrics.json files written by `eval metrics --out` side by side, under the paper's rows.",
    )
    p.add_argument("results", nargs="+", metavar="METRICS_JSON[=LABEL]", help="a metrics.json, optionally =row label")
    p.add_argument("--out", help="write the table to this markdown file too")
    p.add_argument("--no-paper-rows", action="store_true", help="leave out the paper's rows")
    p.set_defaults(handler=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .paper import format_rows

    runs = []
    for item in args.results:
        path, _, label = item.partition("=")
        try:
            runs.append((label or None, json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: {path}: cannot read a metrics.json ({exc})", file=sys.stderr)
            return 2
    table = format_rows(runs, paper_rows=not args.no_paper_rows)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    print(table)
    return 0


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="batch x16 inference of a folder of LR/HR images (xsr_core.eval.run)",
        add_help=False,  # xsr_core.eval.run parses its own options
    )
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="options for xsr_core.eval.run (passed verbatim)")
    p.set_defaults(handler=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    run = importlib.import_module(".run", __package__)
    return int(run.main(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xsr_core.eval", description="XSR evaluation tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_metrics_parser(sub)
    _add_table_parser(sub)
    _add_run_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # evaluation never downloads (read when huggingface_hub loads)
    parser = build_parser()
    if argv and argv[0] == "run":  # everything after "run" belongs to xsr_core.eval.run, verbatim
        args = argparse.Namespace(command="run", run_args=argv[1:], handler=_run_run, verbose=False)
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
