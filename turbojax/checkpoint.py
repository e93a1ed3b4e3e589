"""turbojax's converted-checkpoint format, and `load_dit`.

A converted DiT is a folder:
  config.json          {"format": "turbojax-dit/1", "model": WanConfig fields, "source": {...}, ...}
  params/embeddings/   orbax checkpoint: patch/text/time embeddings, time projection, head
  params/blocks/NNN/   one orbax checkpoint per transformer block
Per-block checkpoints keep conversion streaming: orbax copies what it saves, so saving a block at a time bounds the
host memory at about two blocks (1.4 GB for 14B) instead of twice the model. Trees use the DiT's own parameter
names and layouts (Linear weights [out, in]); a quantised Linear holds int8_weight [N, K] + scale [ceil(N/128),
ceil(K/128)] instead of weight. Folders are written under a temporary name and renamed when complete.

A converted Wan2.1 VAE is a folder with config.json {"format": "turbojax-vae/1", "component": "vae", "model":
VAEConfig fields, "source": {...}} and the whole VAE tree in params/embeddings (no blocks; list indices as strings,
conv weights [*kernel, in, out]).

A converted umT5 text encoder (turbojax.text.load_text_encoder) has the DiT's layout with {"format":
"turbojax-umt5/1", "component": "umt5", "model": UMT5Config fields, "tokenizer": {...} or null}: the token embedding
and final norm in params/embeddings, one checkpoint per block, and the SentencePiece model in tokenizer/spiece.model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from pallas_kernels import int8_matmul
from pallas_kernels.int8_matmul import reference as int8_reference
from turbojax.models.attention import AttentionSpec, as_spec
from turbojax.models.config import WanConfig
from turbojax.models.vae import VAEConfig, WanVAE
from turbojax.models.wan_dit import QUANT_LINEARS, WanDiT, check_linears

FORMAT = "turbojax-dit/1"
VAE_FORMAT = "turbojax-vae/1"
QUANT_BLOCK = int8_reference.BLOCK
# config.json's "quantization" of a W8A8 folder (TurboDiffusion's -quant layout); null for float checkpoints.
QUANTIZATION = {"scheme": "w8a8-int8", "block": [QUANT_BLOCK, QUANT_BLOCK]}
QUANT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
log = logging.getLogger(__name__)


class CheckpointFormatError(Exception):
    """A converted checkpoint folder is missing, incomplete or not what the caller expected."""


def _save_tree(path: Path, tree: dict) -> None:
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, tree)


def _restore_tree(path: Path) -> dict:
    path = Path(path).absolute()  # orbax refuses relative paths
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, restore_args=restore_args)


def write_checkpoint(
    out_dir: str | os.PathLike,
    meta: dict,
    embeddings: dict,
    blocks: Iterable[dict],
    *,
    num_blocks: int,
    overwrite: bool = False,
    progress: bool = True,
    fmt: str = FORMAT,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Writes a converted model atomically: into a temporary sibling folder, renamed to out_dir at the end.

    fmt is config.json's format tag; extra_files maps paths inside the folder to files copied there (a tokenizer)."""
    out = Path(out_dir).absolute()  # orbax refuses relative paths
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_tree(tmp / "params" / "embeddings", embeddings)
        for i, block in enumerate(tqdm(blocks, total=num_blocks, desc="writing blocks", disable=not progress)):
            _save_tree(tmp / "params" / "blocks" / f"{i:03d}", block)
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        (tmp / "config.json").write_text(json.dumps({"format": fmt, **meta}, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous checkpoint back where it was
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | os.PathLike, expected_format: str | None = FORMAT) -> dict:
    """The config.json of a converted folder, checked for the format tag (None: any turbojax format)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointFormatError(
            f"{path} is not a converted turbojax checkpoint (no config.json); convert the original weights first "
            "with `turbojax-convert SRC --out DIR`"
        )
    meta = json.loads(cfg_path.read_text())
    found = meta.get("format")
    if expected_format is None and not str(found).startswith("turbojax-"):
        raise CheckpointFormatError(f"{cfg_path} has format {found!r}, not a turbojax checkpoint format")
    if expected_format is not None and found != expected_format:
        raise CheckpointFormatError(f"{cfg_path} has format {found!r}; this loader reads {expected_format!r}")
    return meta


def config_from_meta(meta: dict) -> WanConfig:
    model = dict(meta["model"])
    model["patch_size"] = tuple(model["patch_size"])
    return WanConfig(**model)


def dequantize(int8_weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W8A8 weight [N, K] int8 with 128x128 tile scales [ceil(N/128), ceil(K/128)] -> fp32 q * s."""
    n, k = int8_weight.shape
    s = np.repeat(np.repeat(np.asarray(scale, np.float32), QUANT_BLOCK, 0), QUANT_BLOCK, 1)[:n, :k]
    return np.asarray(int8_weight, np.float32) * s


def _dequantize_tree(tree: dict) -> dict:
    if not isinstance(tree, dict):
        return tree
    if "int8_weight" in tree:
        rest = {k: v for k, v in tree.items() if k not in ("int8_weight", "scale")}
        return {**rest, "weight": dequantize(tree["int8_weight"], tree["scale"])}
    return {k: _dequantize_tree(v) for k, v in tree.items()}


# The dispatcher's quantiser: the reference on a CPU, the Triton kernel on a GPU. Both are bit-exact; the pure-jnp
# reference run on a GPU is not (XLA's fp32 division there is not correctly rounded: tests/test_int8_matmul.py).
_quantize_jit = jax.jit(int8_matmul.quantize_blockwise)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Linear weight [N, K] -> (int8 [N, K], scale fp32 [ceil(N/128), ceil(K/128)]) with TurboDiffusion's
    quantiser (acceleration.md 5.2). bf16/fp16 weights are quantised as they are; other dtypes are first rounded to
    bf16, the dtype TurboDiffusion's network holds them in when its -quant files are made."""
    w = np.asarray(weight)
    if w.dtype not in QUANT_DTYPES:
        w = w.astype(jnp.bfloat16)
    q, s = _quantize_jit(w)
    return np.asarray(q), np.asarray(s)


def quantize_linears(tree: dict) -> dict:
    """A restored block tree with its float QUANT_LINEARS as W8A8: {int8_weight, scale, bias} with the bias in the
    dtype the weight was quantised from (bf16 unless fp16), as TurboDiffusion's Int8Linear.from_linear stores it.
    Trees without those Linears (the embeddings) and Linears already int8 pass through unchanged."""
    out = dict(tree)
    for group, name in QUANT_LINEARS:
        lin = tree.get(group, {}).get(name)
        if lin is None or "weight" not in lin:
            continue
        q, s = quantize_weight(lin["weight"])
        bias_dtype = lin["weight"].dtype if lin["weight"].dtype in QUANT_DTYPES else np.dtype(jnp.bfloat16)
        out[group] = {**out[group], name: {"int8_weight": q, "scale": s,
                                           "bias": np.asarray(lin["bias"]).astype(bias_dtype)}}
    return out


def is_quantized(meta: dict, path) -> bool:
    """Whether a converted DiT folder's config.json says W8A8, refusing quantisation schemes this loader cannot read."""
    q = meta.get("quantization")
    if q is not None and q != QUANTIZATION:
        raise CheckpointFormatError(f"{path}/config.json has quantization {q!r}; this loader reads {QUANTIZATION!r}")
    return q is not None


def _flatten(tree: dict, prefix=()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, k)))
        elif v is not None:
            out[(*prefix, k)] = v
    return out


def load_dit(
    path: str | os.PathLike,
    *,
    attention: str | AttentionSpec = "dense",
    dtype=jnp.bfloat16,
    residual_dtype=None,
    linears: str | None = None,
    progress: bool = True,
) -> WanDiT:
    """Loads a converted DiT folder as a callable WanDiT on the default device.

    dtype is the matmul/activation dtype (bf16 for real use, fp32 for parity checks); norm weights, modulation, the
    time embedding and the head stay fp32. residual_dtype defaults to the checkpoint family's (bf16 for
    TurboDiffusion, fp32 for stock Wan).
    linears picks how the 10 block Linears run (wan_dit.QUANT_LINEARS; every other Linear stays float):
      "w8a8"   TurboDiffusion's W8A8: int8 weights with 128 x 128 tile scales, activations quantised on every call,
               the Pallas int8 GEMM on GPUs. A -quant folder's int8 weights are kept as they are; a float folder's
               are quantised at load with TurboDiffusion's quantiser (what `turbojax-quantize` writes). Needs a
               bf16/fp16 dtype.
      "float"  weights in dtype; a -quant folder's are dequantised (int8 * scale).
      None     follows the folder: "w8a8" for a -quant checkpoint (config.json "quantization"), else "float"."""
    path = Path(path)
    meta = read_meta(path)
    cfg = config_from_meta(meta)
    quantized = is_quantized(meta, path)
    linears = linears or ("w8a8" if quantized else "float")
    check_linears(linears, dtype)
    spec = as_spec(attention)
    if spec.kind in ("sla", "sagesla") and not cfg.sla_proj:
        warnings.warn(f"{path} has no SLA proj_l weights (not an SLA-tuned checkpoint): {spec.kind} runs its sparse "
                      f"branch only")

    abstract = nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, residual_dtype=residual_dtype, attention=spec,
                                             linears=linears, rngs=nnx.Rngs(0)))
    transform = {(True, "float"): _dequantize_tree, (False, "w8a8"): quantize_linears}.get((quantized, linears))
    return restore_module(path, abstract, cfg.num_layers, transform=transform, progress=progress)


def restore_module(path: Path, abstract: nnx.Module, num_blocks: int, *, transform=None, progress: bool = True):
    """The module of a converted folder, its parameters on the default device, from an abstract (eval_shape) module.

    params/embeddings holds everything outside `blocks`; params/blocks/NNN block NNN, stacked here on the host into
    the module's leading layer axis (one host copy of the stacked blocks, then one transfer each). transform maps
    each restored tree first (dequantise, quantise). Values are cast to the module's dtypes; every name and shape
    must match."""
    transform = transform or (lambda tree: tree)
    graphdef, abs_state = nnx.split(abstract)
    targets = {path_: leaf for path_, leaf in nnx.to_flat_state(abs_state)}

    def checked(key: tuple, value: np.ndarray, shape: tuple, name: str) -> np.ndarray:
        """value as the target's dtype (no copy when it already is), after name and shape checks."""
        if key not in targets:
            raise CheckpointFormatError(f"{path}: unexpected parameter {name}")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointFormatError(f"{path}: parameter {name} has shape {value.shape}, the model needs {shape}")
        return np.asarray(value).astype(targets[key].dtype, copy=False)

    values = {}
    embeddings = transform(_restore_tree(path / "params" / "embeddings"))
    for key, value in _flatten(embeddings).items():
        name = ".".join(map(str, key))
        values[key] = jax.device_put(checked(key, value, targets.get(key, value).shape, name))

    block_dir = path / "params" / "blocks"
    extra = sorted(p.name for p in block_dir.iterdir() if not p.name.isdigit() or int(p.name) >= num_blocks) \
        if block_dir.exists() else []
    if extra:
        raise CheckpointFormatError(f"{path}: block folders {', '.join(extra)} beyond the model's {num_blocks} "
                                    "blocks; the folder does not match its config.json")
    stacked: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, int] = {}
    for i in tqdm(range(num_blocks), desc="loading blocks", disable=not progress):
        block_path = block_dir / f"{i:03d}"
        if not block_path.exists():
            raise CheckpointFormatError(f"{path}: block {i} is missing ({block_path}); re-run the conversion")
        for key, value in _flatten(transform(_restore_tree(block_path))).items():
            full, name = ("blocks", *key), f"blocks.{i}.{'.'.join(key)}"
            value = checked(full, value, targets[full].shape[1:] if full in targets else value.shape, name)
            if full not in stacked:
                stacked[full] = np.empty(targets[full].shape, targets[full].dtype)
            stacked[full][i] = value
            filled[full] = filled.get(full, 0) + 1
    for key in list(stacked):
        if filled[key] != num_blocks:
            raise CheckpointFormatError(f"{path}: parameter {'.'.join(map(str, key))} is in {filled[key]} of the "
                                        f"{num_blocks} blocks; re-run the conversion")
        values[key] = jax.device_put(stacked.pop(key))

    missing = sorted(".".join(map(str, k)) for k in targets if k not in values)
    if missing:
        raise CheckpointFormatError(f"{path}: missing parameters: {', '.join(missing)}")
    state = nnx.from_flat_state([(k, targets[k].replace(values[k])) for k in targets])
    return nnx.merge(graphdef, state)


def load_vae(path: str | os.PathLike, *, dtype=jnp.bfloat16, conv: str | None = None) -> WanVAE:
    """Loads a converted Wan2.1 VAE folder as a WanVAE on the default device.

    dtype is the weight and activation dtype (bf16 as TurboDiffusion runs the VAE, fp32 for parity checks); the RMS
    gains stay fp32. conv picks the convolution path (models/vae.py); by default "ndhwc" on GPUs (the fastest on an
    H100: 81 frames decode in 715 ms at 480p against 765 for "fold", docs/PERF.md) and "fold" elsewhere."""
    if conv is None:
        conv = "ndhwc" if jax.default_backend() == "gpu" else "fold"
    path = Path(path)
    model = read_meta(path, VAE_FORMAT)["model"]
    cfg = VAEConfig(**{**model, "dim_mult": tuple(model["dim_mult"]),
                       "temporal_downsample": tuple(model["temporal_downsample"])})
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, dtype=dtype, conv=conv, rngs=nnx.Rngs(0)))
    return restore_module(path, abstract, 0, transform=_list_indices, progress=False)


def _list_indices(tree):
    """Saved trees spell nnx.List indices as strings ("down" -> "3"); the module's paths use ints."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _list_indices(v) for k, v in tree.items()}
