"""turbojax-convert: TurboDiffusion / Wan / diffusers DiT checkpoints -> a turbojax checkpoint folder, without torch."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from convert import layouts, sources, umt5_layouts, vae_layouts
from convert.errors import CheckpointError
from turbojax import checkpoint, text
from turbojax.models.config import PRESETS


def _source_meta(files: list[Path], layout: str, tensors: dict[str, np.ndarray], progress: bool) -> dict:
    """config.json's record of what was converted: the layout, each source file's sha256, the tensors' dtypes."""
    dtypes: dict[str, int] = {}
    for v in tensors.values():
        dtypes[v.dtype.name] = dtypes.get(v.dtype.name, 0) + 1
    return {"layout": layout, "sha256": sources.sha256_files(sources.source_files(files), progress), "dtypes": dtypes}


def convert(
    srcs: list[str],
    out: str,
    *,
    preset: str | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts one DiT, Wan2.1 VAE or umT5 checkpoint (one file, its shards, or a folder) into a turbojax checkpoint
    folder at `out`."""
    files, config_json = sources.resolve(srcs)
    tensors = layouts.strip_prefixes(sources.read_tensors(files))
    if vae_layouts.is_vae(tensors):
        if preset is not None or num_heads is not None:
            raise CheckpointError("--preset and --num-heads describe a DiT; this checkpoint is a Wan VAE")
        return convert_vae(files, tensors, config_json, out, overwrite=overwrite, progress=progress)
    if umt5_layouts.detect_layout(tensors) is not None:
        if preset is not None or num_heads is not None:
            raise CheckpointError("--preset and --num-heads describe a DiT; this checkpoint is a umT5 text encoder")
        return convert_umt5(files, tensors, config_json, out, overwrite=overwrite, progress=progress)
    layout = layouts.detect_layout(tensors)
    tensors = layouts.to_canonical(tensors, layout)
    det = layouts.infer_config(tensors, layout, config_json, num_heads=num_heads, preset=preset)
    layouts.validate(tensors, det.config, det.quantized)
    meta = {
        "model": dataclasses.asdict(det.config),
        "preset": det.preset,
        "source": _source_meta(files, layout, tensors, progress),
        "quantization": checkpoint.QUANTIZATION if det.quantized else None,
    }
    blocks = (layouts.block_tree(tensors, i) for i in range(det.config.num_layers))
    return checkpoint.write_checkpoint(
        out, meta, layouts.embeddings_tree(tensors), blocks,
        num_blocks=det.config.num_layers, overwrite=overwrite, progress=progress,
    )


def convert_vae(files: list[Path], tensors: dict[str, np.ndarray], config_json: dict | None, out: str, *,
                overwrite: bool, progress: bool) -> Path:
    """A Wan2.1 VAE state dict (Wan .pth or diffusers layout) -> a turbojax VAE folder (checkpoint.load_vae)."""
    layout = vae_layouts.detect_layout(tensors, config_json)
    tensors = vae_layouts.to_canonical(tensors, layout)
    cfg = vae_layouts.infer_config(tensors, config_json)
    vae_layouts.validate(tensors, cfg)
    meta = {
        "component": "vae",
        "model": dataclasses.asdict(cfg),
        "source": _source_meta(files, layout, tensors, progress),
    }
    # One tree, no blocks: the VAE is 0.5 GB in fp32, so streaming it per block buys nothing.
    return checkpoint.write_checkpoint(out, meta, vae_layouts.to_tree(tensors), [], num_blocks=0,
                                       overwrite=overwrite, progress=False, fmt=checkpoint.VAE_FORMAT)


def convert_umt5(files: list[Path], tensors: dict[str, np.ndarray], config_json: dict | None, out: str, *,
                 overwrite: bool, progress: bool) -> Path:
    """A umT5 encoder (Wan .pth or transformers safetensors) -> a turbojax text-encoder folder
    (turbojax.load_text_encoder), streamed a block at a time, with the SentencePiece model found beside the source."""
    layout = umt5_layouts.detect_layout(tensors)
    tensors = umt5_layouts.to_canonical(tensors, layout)
    cfg = umt5_layouts.infer_config(tensors, layout, config_json)
    umt5_layouts.validate(tensors, cfg)
    spm = umt5_layouts.find_tokenizer(files[0])
    meta = {
        "component": "umt5",
        "model": dataclasses.asdict(cfg),
        "preset": umt5_layouts.preset_of(cfg),
        "source": _source_meta(files, layout, tensors, progress),
        "tokenizer": None if spm is None else {
            "file": text.TOKENIZER_FILE, "source": str(spm), "sha256": sources.sha256_files([spm], False)[spm.name],
        },
    }
    blocks = (umt5_layouts.block_tree(tensors, i) for i in range(cfg.num_layers))
    return checkpoint.write_checkpoint(
        out, meta, umt5_layouts.embeddings_tree(tensors), blocks, num_blocks=cfg.num_layers, overwrite=overwrite,
        progress=progress, fmt=text.FORMAT, extra_files={text.TOKENIZER_FILE: spm} if spm else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbojax-convert",
        description="Convert a Wan DiT checkpoint (TurboDiffusion .pth incl. -quant, stock Wan .pth/.safetensors, or "
        "diffusers safetensors), the Wan2.1 VAE (Wan2.1_VAE.pth or diffusers AutoencoderKLWan) or the umT5 text "
        "encoder (models_t5_umt5-xxl-enc-bf16.pth or transformers UMT5EncoderModel) into a turbojax checkpoint "
        "folder. Never imports torch or runs pickle code.",
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
    meta = checkpoint.read_meta(out, None)
    if meta.get("component") == "vae":
        print(f"wrote {out} (Wan2.1 VAE, layout {meta['source']['layout']}, z_dim {meta['model']['z_dim']})")
        return 0
    if meta.get("component") == "umt5":
        print(f"wrote {out} (umT5 text encoder, layout {meta['source']['layout']}, preset {meta['preset']}, "
              + (f"tokenizer from {meta['tokenizer']['source']})" if meta["tokenizer"] else
                 "no tokenizer found beside the source: pass tokenizer=.../spiece.model to load_text_encoder)"))
        return 0
    print(f"wrote {out} (layout {meta['source']['layout']}, preset {meta['preset']}, "
          f"{'W8A8 int8' if meta['quantization'] else 'unquantised'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
