"""``python -m xsr_core.train {prepare,rfa,i2t,adapter,export}`` (also ``xsr train ...``).

Every training stage takes ``--config FILE.yaml|json`` plus one ``--option value`` per config field
(flags override the file). Multi-GPU: ``accelerate launch --num_processes N -m xsr_core.train rfa ...``.
See xsr_core/train/README.md for the full recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from ..cli_common import error_status, options
from .config import AdapterTrainConfig, I2TTrainConfig, RFATrainConfig, config_parser, parse_config
from .data import PrepareConfig, PrepareError

STAGES = {"rfa": RFATrainConfig, "i2t": I2TTrainConfig, "adapter": AdapterTrainConfig}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show the traceback of an error (default: one line)"
    )
    parser = argparse.ArgumentParser(prog="xsr train", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "prepare", parents=[common], help="split images, make 512/32 pairs, captions, CLIP caches, reference DB"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of HR images (recursive)")
    src.add_argument("--list", dest="list_file", help="list file: PATH or PATH<TAB>CAPTION per line")
    p.add_argument("--out", required=True, help="prepared data folder")
    p.add_argument("--encoder", required=True, help="CLIP vision .safetensors (the one the nodes will use)")
    p.add_argument("--captions", help="captions .jsonl ({'image','caption'} per line) or .csv (image,caption)")
    p.add_argument("--blip2", help="local BLIP-2 model folder to caption images without one")
    for f in dataclasses.fields(PrepareConfig):
        typ = bool if f.type in (bool, "bool") else {"int": int, "str": str}.get(str(f.type), type(f.default))
        if typ is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=f"(default: {f.default})")
        else:
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f"(default: {f.default})")
    for name, cls in STAGES.items():
        sub.add_parser(
            name,
            parents=[common, config_parser(cls, add_help=False)],
            help=(cls.__doc__ or "").strip().splitlines()[0],
        )
    e = sub.add_parser("export", parents=[common], help="write trained weights into a ComfyUI models/ layout")
    e.add_argument("--out", required=True, help="ComfyUI models/ folder")
    e.add_argument("--rfa", help="rfa run folder (or rfa.safetensors)")
    e.add_argument("--i2t", help="i2t run folder (or i2t.safetensors)")
    e.add_argument("--adapter", help="adapter run folder (holds final/adain_adapter.safetensors + final/controlnet)")
    e.add_argument(
        "--name",
        default=None,
        help="ControlNet file name stem (default: xsr -> xsr_controlnet.safetensors for "
        "the adain variant, xsr_text_only -> xsr_text_only_controlnet.safetensors for the text-only one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "prepare":
            from .data import prepare

            cfg = PrepareConfig(**options(args, (f.name for f in dataclasses.fields(PrepareConfig))))
            info = prepare(args.out, args.encoder, **options(args, "images list_file captions blip2"), config=cfg)
            print(
                json.dumps(
                    {"splits": info["splits"], "skipped": len(info["skipped"]), "dedup": info.get("dedup")}, indent=2
                )
            )
            return 0
        if args.cmd == "export":
            from .export import export

            paths = export(args.out, rfa=args.rfa, i2t=args.i2t, adapter=args.adapter, name=args.name)
            for k, v in paths.items():
                print(f"{k:12s} {v}")
            return 0
        # the stage's flags once more, through its HfArgumentParser: defaults < --config file < flags
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("-v", "--verbose", action="store_true")
        cfg = parse_config(STAGES[args.cmd], argv[argv.index(args.cmd) + 1 :], parents=[common])
        if args.cmd == "rfa":
            from .rfa import train_rfa as run
        elif args.cmd == "i2t":
            from .i2t import train_i2t as run
        else:
            from .adapter import train_adapter as run
        result = run(cfg)
        if result.get("eval"):
            print(json.dumps({"step": result["step"], "eval": result["eval"]}, indent=2, default=str))
        return 0
    except Exception as e:  # one clear line for the user; -v shows the traceback
        if getattr(args, "verbose", False):
            raise
        return error_status(e, "xsr train", expected=isinstance(e, (PrepareError, ValueError, FileNotFoundError)))


if __name__ == "__main__":
    raise SystemExit(main())
