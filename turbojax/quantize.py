"""turbojax-quantize: a converted float DiT folder -> a W8A8 folder, TurboDiffusion's `-quant` layout.

    turbojax-quantize ckpt/turbowan-1.3b --out ckpt/turbowan-1.3b-w8a8

The 10 Linears of every block (wan_dit.QUANT_LINEARS) become int8_weight [N, K] + scale [ceil(N/128), ceil(K/128)]
+ bias (bf16), from the bf16 weights with acceleration.md 5.2's quantiser: the int8 weights and scales TurboDiffusion's
`Int8Linear.from_linear` (scripts/quantize.sh) makes from the same weights. Every other tensor is copied unchanged.
Runs on the CPU, reads and writes one block at a time, and writes the folder atomically (checkpoint.write_checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from turbojax import checkpoint
from turbojax.checkpoint import CheckpointFormatError
from turbojax.models.wan_dit import QUANT_LINEARS


def _quantized_block(src: Path, i: int) -> dict:
    """Block i of src with its QUANT_LINEARS quantised; a block without one of them as a float Linear is refused."""
    path = src / "params" / "blocks" / f"{i:03d}"
    if not path.is_dir():
        raise CheckpointFormatError(f"{src}: block {i} is missing ({path}); re-run the conversion")
    tree = checkpoint._restore_tree(path)
    for group, name in QUANT_LINEARS:
        if "weight" not in tree.get(group, {}).get(name, {}):
            raise CheckpointFormatError(f"{src}: block {i} has no float weight for {group}.{name}; the folder does "
                                        "not match its config.json")
    return checkpoint.quantize_linears(tree)


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                        progress: bool = True) -> Path:
    """Writes the W8A8 version of the converted float DiT folder src to out; returns out's absolute path."""
    src = Path(src).absolute()
    meta = checkpoint.read_meta(src)
    if checkpoint.is_quantized(meta, src):
        raise CheckpointFormatError(f"{src} is already W8A8 (config.json quantization {meta['quantization']})")
    num_blocks = checkpoint.config_from_meta(meta).num_layers
    out_meta = {k: v for k, v in meta.items() if k != "format"}
    out_meta["quantization"] = checkpoint.QUANTIZATION
    out_meta["quantized_from"] = {"path": str(src), "tool": "turbojax-quantize"}
    embeddings = checkpoint._restore_tree(src / "params" / "embeddings")
    blocks = (_quantized_block(src, i) for i in range(num_blocks))
    return checkpoint.write_checkpoint(out, out_meta, embeddings, blocks, num_blocks=num_blocks, overwrite=overwrite,
                                       progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbojax-quantize",
        description="Quantise a converted float DiT folder (turbojax-convert output) to TurboDiffusion's W8A8 "
        "layout: the 10 Linears of every block as int8 weights with one fp32 scale per 128x128 tile. "
        "load_dit runs the result with the int8 GEMM.",
    )
    parser.add_argument("src", help="converted DiT folder (bf16 or fp32 weights)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = quantize_checkpoint(args.src, args.out, overwrite=args.overwrite, progress=not args.quiet)
    except (CheckpointFormatError, OSError, ValueError) as e:
        print(f"turbojax-quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (W8A8 int8, {len(QUANT_LINEARS)} Linears per block, from {args.src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
