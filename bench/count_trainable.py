"""Trainable parameters of stage 2 per ControlNet fine-tuning scope and variant (issue #11 item 2).

Builds the real-shape SD1.5 ControlNet (``SD15_CONTROLNET_CONFIG``, the tile ControlNet's structure) and the
AdaIN adapter for the SD1.5 U-Net + ControlNet (``SD15_UNET_CONFIG``, E width of ViT-L/14 tokens) on the
meta device: no weights, no download, no memory. The scopes are selected with the trainer's own
``select_controlnet_params`` (what ``--controlnet_train`` does), so the figures are the ones a real run logs.

    python bench/count_trainable.py            # writes bench/results/trainable_params.{json,md}

Variants: ``adain`` (the full model: adapter + the ControlNet scope) and ``text_only`` (Ours_Base: the
ControlNet scope alone, no adapter).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xsr_core.testing.sd15 import SD15_CONTROLNET_CONFIG, SD15_UNET_CONFIG  # noqa: E402


def count(embed_dim: int, proj_hidden: int) -> dict:
    from diffusers import ControlNetModel

    from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
    from xsr_core.train.adapter import CONTROLNET_SCOPES, select_controlnet_params

    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(SD15_CONTROLNET_CONFIG)
        adapter = AdaINAdapter(
            AdaINAdapterConfig.from_unet_config(dict(SD15_UNET_CONFIG), embed_dim=embed_dim, proj_hidden=proj_hidden)
        )
    n_cn = sum(p.numel() for p in controlnet.parameters())
    n_adapter = sum(p.numel() for p in adapter.parameters())
    rows = []
    for scope in ("none", "zero_convs", "attention", "all"):
        n = select_controlnet_params(controlnet, scope)
        for variant in ("adain", "text_only"):
            if variant == "text_only" and scope == "none":
                continue  # nothing would train (the trainer refuses an empty optimiser)
            total = n + (n_adapter if variant == "adain" else 0)
            rows.append(
                {
                    "variant": variant,
                    "controlnet_train": scope,
                    "default": scope == "attention",
                    "controlnet_trainable": n,
                    "controlnet_trainable_pct": 100.0 * n / n_cn,
                    "adapter_trainable": n_adapter if variant == "adain" else 0,
                    "total_trainable": total,
                }
            )
    return {
        "controlnet_params": n_cn,
        "adapter_params": n_adapter,
        "adapter_blocks": len(adapter.block_ids),
        "embed_dim": embed_dim,
        "adapter_proj_hidden": proj_hidden,
        "scope_patterns": {k: list(v) for k, v in CONTROLNET_SCOPES.items()},
        "rows": rows,
    }


def write_results(out: Path, res: dict, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": "meta (no weights; counts only)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
    }
    (out / "trainable_params.json").write_text(json.dumps({**meta, **res}, indent=2))
    lines = [
        "# Stage-2 trainable parameters per ControlNet scope (real SD1.5 shapes)",
        "",
        *(f"- {k}: `{v}`" for k, v in meta.items()),
        f"- ControlNet (SD15_CONTROLNET_CONFIG): {res['controlnet_params']:,} parameters",
        f"- AdaIN adapter ({res['adapter_blocks']} blocks, E width {res['embed_dim']}, proj_hidden "
        f"{res['adapter_proj_hidden']}): {res['adapter_params']:,} parameters",
        "",
        "| variant | --controlnet_train | ControlNet trainable | % of ControlNet | adapter | total trainable |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        scope = f"**{r['controlnet_train']}** (default)" if r["default"] else r["controlnet_train"]
        lines.append(
            f"| {r['variant']} | {scope} | {r['controlnet_trainable']:,} | {r['controlnet_trainable_pct']:.1f} % | "
            f"{r['adapter_trainable']:,} | {r['total_trainable']:,} |"
        )
    lines += [
        "",
        "Scopes: " + "; ".join(f"`{k}` = names containing {', '.join(v)}" for k, v in res["scope_patterns"].items()),
        "(`all` = every ControlNet parameter, `none` = the adapter alone). `text_only` with `none` trains nothing.",
    ]
    (out / "trainable_params.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embed-dim", type=int, default=1024, help="width of E (ViT-L/14 tokens: 1024)")
    p.add_argument("--proj-hidden", type=int, default=256, help="--adapter_proj_hidden of the stage-2 run")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    res = count(args.embed_dim, args.proj_hidden)
    write_results(
        Path(args.out), res, " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    )
    for r in res["rows"]:
        print(json.dumps(r))
    print(f"wrote {Path(args.out) / 'trainable_params'}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
