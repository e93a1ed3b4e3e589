"""turbojax-convert: TurboDiffusion / Wan / diffusers DiT checkpoints -> a turbojax checkpoint folder, without torch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from convert import layouts, sources
from convert.errors import CheckpointError
from turbojax import checkpoint
from turbojax.models.config import PRESETS


def _dtype_summary(tensors: dict[str, np.ndarray]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in tensors.values():
        counts[v.dtype.name] = counts.get(v.dtype.name, 0) + 1
    return counts


def convert(
    srcs: list[str],
    out: str,
    *,
    preset: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts one DiT checkpoint (one file, its shards, or a folder) into a turbojax checkpoint folder at `out`."""
    files, config_json = sources.resolve(srcs)
    tensors = layouts.strip_prefixes(sources.read_tensors(files))
    layout = layouts.detect_layout(tensors)
    tensors = layouts.to_canonical(tensors, layout)
    det = layouts.infer_config(tensors, layout, config_json, num_heads=num_heads, preset=preset)
    layouts.validate(tensors, det.config, det.quantized)
    meta = {
        "model": dataclasses.asdict(det.config),
        "preset": det.preset,
        "source": {
            "layout": layout,
            "sha256": sources.sha256_files(sources.source_files(files), progress),
            "dtypes": _dtype_summary(tensors),
        },
        "quantization": {"scheme": "w8a8-int8", "block": [128, 128]} if det.quantized else None,
    }
    blocks = (layouts.block_tree(tensors, i) for i in range(det.config.num_layers))
    return checkpoint.write_checkpoint(
        out, meta, layouts.embeddings_tree(tensors), blocks,
        num_blocks=det.config.num_layers, overwrite=overwrite, progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbojax-convert",
        description="Convert a Wan DiT checkpoint (TurboDiffusion .pth incl. -quant, stock Wan .pth/.safetensors, or "
        "diffusers safetensors) into a turbojax checkpoint folder. Never imports torch or runs pickle code.",
    )
    parser.add_argument("src", nargs="+", help="checkpoint file(s), a sharded index .json, or a folder holding one")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="require this preset's sizes")
    parser.add_argument("--num-heads", type=int, help="attention heads (when no config.json or preset tells)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, preset=args.preset, num_heads=args.num_heads,
                      overwrite=args.overwrite, progress=not args.quiet)
    except (CheckpointError, checkpoint.CheckpointFormatError, OSError, ValueError) as e:
        print(f"turbojax-convert: error: {e}", file=sys.stderr)
        return 2
    meta = checkpoint.read_meta(out)
    print(f"wrote {out} (layout {meta['source']['layout']}, preset {meta['preset']}, "
          f"{'W8A8 int8' if meta['quantization'] else 'unquantised'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
