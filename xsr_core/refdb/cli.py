"""Command line for reference DBs: ``python -m xsr_core.refdb <command> ...`` (or ``xsr refdb ...``).

Commands: build, add, search, info, verify, export, merge. Thin wrappers over :mod:`.build` and
:mod:`.db`; errors are printed as one clear line with exit status 2 (``-v``: the traceback).

Examples::

    python -m xsr_core.refdb build --images /data/imagenet/train --encoder clip_vision_l.safetensors \\
        --out models/xsr_refdb/imagenet --mode packed --exclude /data/imagenet_test
    torchrun --nproc-per-node 8 -m xsr_core.refdb build ... --shard auto   # one shard per GPU
    python -m xsr_core.refdb merge --out DB DB.shard0of8 ... DB.shard7of8
    python -m xsr_core.refdb search --db DB --encoder clip_vision_l.safetensors --image query.png -k 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..cli_common import error_status, options
from .store import RefDBError

logger = logging.getLogger(__name__)


def _add_build_options(p: argparse.ArgumentParser, *, with_mode: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of HR images (searched recursively; sorted → ids)")
    src.add_argument("--list", dest="list_file", help="text file: one image path per line, optional TAB caption")
    p.add_argument("--encoder", required=True, help="CLIP vision .safetensors (e.g. clip_vision_l.safetensors)")
    if with_mode:
        p.add_argument(
            "--mode",
            choices=["paths", "packed"],
            default="paths",
            help="paths: store source paths; packed: store resized JPEGs inside the DB (copyable)",
        )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--index", default="auto", help="auto or a faiss factory key (Flat, IVF4096_HNSW32,SQ8, HNSW32)")
    p.add_argument("--chunk-size", type=int, default=4096, help="files per committed (resumable) chunk")
    p.add_argument("--min-side", type=int, default=64, help="skip images with a smaller side")
    p.add_argument("--max-memory-gb", type=float, default=None, help="index memory budget (auto choice)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for faiss/torch")
    p.add_argument("--no-progress", action="store_true")
    _add_allow_root(p, "besides the --images folder, folders its files (symlinks) may resolve into")


def _add_allow_root(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help=f"{what} (repeatable; XSR_ALLOWED_ROOTS is read too)",
    )


# BuildConfig fields set from the command-line option of the same name (every build-like command has them)
_SAME_NAMED = "batch_size workers device precision index chunk_size min_side max_memory_gb threads".split()


def _config(args: argparse.Namespace, **over):
    from .build import BuildConfig

    shard = over.pop("shard", None) or (0, 1)
    return BuildConfig(
        **options(args, _SAME_NAMED),
        mode=getattr(args, "mode", "paths"),
        exclude_threshold=getattr(args, "exclude_threshold", 0.95),
        shard=shard,
        progress=not args.no_progress,
        allowed_roots=tuple(args.allow_root),
        **over,
    )


def _auto_shard(text: str | None) -> tuple[int, int]:
    """``--shard i/n``, or ``auto`` from torchrun/accelerate's RANK/WORLD_SIZE (and pin the GPU)."""
    from .build import parse_shard

    if not text:
        return 0, 1
    if text == "auto":
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        world = int(os.environ.get("WORLD_SIZE", 1))
        return rank, world
    return parse_shard(text)


def cmd_build(args: argparse.Namespace) -> int:
    from .build import build_db

    shard = _auto_shard(args.shard)
    out = args.out
    if shard[1] > 1 and args.shard == "auto":
        out = f"{args.out}.shard{shard[0]}of{shard[1]}"
        if args.device == "auto":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard[0]))}"
    cfg = _config(args, shard=shard)
    info = build_db(
        out, args.encoder, images=args.images, list_file=args.list_file, exclude=args.exclude or (), config=cfg
    )
    _print_summary(out, info)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from .build import add_images

    info = add_images(args.db, args.encoder, images=args.images, list_file=args.list_file, config=_config(args))
    _print_summary(args.db, info)
    return 0


def _print_summary(out: str, info: dict) -> None:
    if "shard" in info:
        print(f"shard {info['shard'][0]}/{info['shard'][1]} written to {out}: {info['counts']}")
        return
    c = info["counts"]
    print(
        f"{out}: {info['n']} references ({c['skipped']} skipped, {c['duplicates']} duplicates, "
        f"{c['excluded']} excluded; see report.json), index {info['index']['key']}"
    )


def cmd_search(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..clip_vision import ClipVisionEncoder
    from .db import ReferenceDB
    from .images import decode_image

    db = ReferenceDB.open(args.db, allowed_roots=args.allow_root)
    enc = ClipVisionEncoder.from_file(args.encoder)
    db.check_encoder(enc.fingerprint)
    results = []
    for image in args.image:
        try:
            img = decode_image(Path(image).read_bytes(), min_side=1, what=image)
        except OSError as e:
            raise RefDBError(f"query image {image} cannot be read ({e.strerror or e})") from e
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        cls = enc.encode_images(x, lr=args.lr).cls
        scores, ids = db.search(cls, args.k)
        found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        recs = db.records([i for _, i in found])
        hits = [
            {"id": i, "score": s, "path": r.path, "caption": r.caption} for (s, i), r in zip(found, recs, strict=True)
        ]
        results.append({"query": image, "hits": hits})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for res in results:
            print(res["query"])
            for h in res["hits"]:
                print(f"  {h['score']:.4f}  #{h['id']}  {h['path']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .db import ReferenceDB

    with ReferenceDB.open(args.db) as db:
        print(json.dumps(db.info, indent=1, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .db import verify_db

    problems = verify_db(args.db, check_hashes=args.hashes, allowed_roots=args.allow_root)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{args.db}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .build import export_db

    ids = None
    if args.ids:
        ids = [int(t) for t in Path(args.ids).read_text().replace(",", " ").split()]
    info = export_db(args.db, args.out, ids=ids, count=args.count, index=args.index, threads=args.threads)
    _print_summary(args.out, info)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .build import merge_shards

    info = merge_shards(args.out, args.shards, index=args.index, max_memory_gb=args.max_memory_gb, threads=args.threads)
    _print_summary(args.out, info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xsr_core.refdb",
        description="XSR reference databases",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log; show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build (or resume) a DB from HR images")
    _add_build_options(p)
    p.add_argument("--out", required=True, help="DB folder")
    p.add_argument("--exclude", action="append", help="evaluation image folder/file to keep out (repeatable)")
    p.add_argument("--exclude-threshold", type=float, default=0.95, help="CLS cosine that counts as the same image")
    p.add_argument(
        "--shard", default=None, help="i/n: build shard i of n (merge afterwards); auto: from RANK/WORLD_SIZE"
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("add", help="append images to a DB (existing ids unchanged)")
    _add_build_options(p, with_mode=False)
    p.add_argument("--db", required=True)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("search", help="top-K references of image file(s)")
    p.add_argument("--db", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--image", required=True, nargs="+")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--lr", action="store_true", help="queries are LR images (LR preprocessing, no RFA)")
    p.add_argument("--json", action="store_true")
    _add_allow_root(p, "folders a paths-mode DB may read its source images from")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="print info.json")
    p.add_argument("--db", required=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check index / metadata / manifest consistency and source files")
    p.add_argument("--db", required=True)
    p.add_argument("--hashes", action="store_true", help="also re-hash source files (paths mode)")
    _add_allow_root(p, "folders a paths-mode DB may read its source images from (others are reported)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a DB holding a subset (by id list or first N)")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", help="file of ids (whitespace/comma separated)")
    g.add_argument("--count", type=int)
    p.add_argument("--index", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="merge shard DBs built with --shard into one")
    p.add_argument("--out", required=True)
    p.add_argument("shards", nargs="+")
    p.add_argument("--index", default="auto")
    p.add_argument("--max-memory-gb", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 verify found problems, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (RefDBError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        return error_status(e, "xsr refdb")
