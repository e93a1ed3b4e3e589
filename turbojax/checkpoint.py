"""turbojax's converted-checkpoint format, and `load_dit`.

A converted DiT is a folder:
  config.json          {"format": "turbojax-dit/1", "model": WanConfig fields, "source": {...}, ...}
  params/embeddings/   orbax checkpoint: patch/text/time embeddings, time projection, head
  params/blocks/NNN/   one orbax checkpoint per transformer block
Per-block checkpoints keep conversion streaming: orbax copies what it saves, so saving a block at a time bounds the
host memory at about two blocks (1.4 GB for 14B) instead of twice the model. Trees use the DiT's own parameter
names and layouts (Linear weights [out, in]); a quantised Linear holds int8_weight [N, K] + scale [ceil(N/128),
ceil(K/128)] instead of weight. Folders are written under a temporary name and renamed when complete.
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

from turbojax.models.attention import AttentionSpec, as_spec
from turbojax.models.config import WanConfig
from turbojax.models.wan_dit import WanDiT

FORMAT = "turbojax-dit/1"
QUANT_BLOCK = 128
log = logging.getLogger(__name__)


class CheckpointFormatError(Exception):
    """A converted checkpoint folder is missing, incomplete or not what the caller expected."""


def _save_tree(path: Path, tree: dict) -> None:
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, tree)


def _restore_tree(path: Path) -> dict:
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
) -> Path:
    """Writes a converted DiT atomically: into a temporary sibling folder, renamed to out_dir at the end."""
    out = Path(out_dir)
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
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """The config.json of a converted DiT folder, checked for the format tag."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointFormatError(
            f"{path} is not a converted turbojax checkpoint (no config.json); convert the original weights first "
            "with `turbojax-convert SRC --out DIR`"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{cfg_path} has format {meta.get('format')!r}; this turbojax reads {FORMAT!r}")
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
    progress: bool = True,
) -> WanDiT:
    """Loads a converted DiT folder as a callable WanDiT on the default device.

    dtype is the matmul/activation dtype (bf16 for real use, fp32 for parity checks); norm weights, modulation, the
    time embedding and the head stay fp32. residual_dtype defaults to the checkpoint family's (bf16 for
    TurboDiffusion, fp32 for stock Wan). `-quant` checkpoints are dequantised here until the W8A8 kernels land."""
    path = Path(path)
    meta = read_meta(path)
    cfg = config_from_meta(meta)
    spec = as_spec(attention)
    if spec.kind == "sla" and not cfg.sla_proj:
        warnings.warn(f"{path} has no SLA proj_l weights (not an SLA-tuned checkpoint): SLA runs its sparse branch only")

    abstract = nnx.eval_shape(
        lambda: WanDiT(cfg, dtype=dtype, residual_dtype=residual_dtype, attention=spec, rngs=nnx.Rngs(0))
    )
    graphdef, abs_state = nnx.split(abstract)
    targets = {path_: leaf for path_, leaf in nnx.to_flat_state(abs_state)}
    quantised = meta.get("quantization") is not None
    if quantised:
        warnings.warn(
            f"{path} holds W8A8 int8 weights; they are dequantised to {jnp.dtype(dtype).name} at load until the "
            "Pallas int8 GEMM is available"
        )

    def put(key: tuple, value: np.ndarray):
        if key not in targets:
            raise CheckpointFormatError(f"{path}: unexpected parameter {'.'.join(map(str, key))}")
        target = targets[key]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointFormatError(
                f"{path}: parameter {'.'.join(map(str, key))} has shape {value.shape}, the model needs {target.shape}"
            )
        return jax.device_put(np.asarray(value).astype(target.dtype))

    values = {}
    embeddings = _dequantize_tree(_restore_tree(path / "params" / "embeddings"))
    for key, value in _flatten(embeddings).items():
        values[key] = put(key, value)

    block_dir = path / "params" / "blocks"
    stacked: dict[tuple, np.ndarray] = {}
    for i in tqdm(range(cfg.num_layers), desc="loading blocks", disable=not progress):
        block_path = block_dir / f"{i:03d}"
        if not block_path.exists():
            raise CheckpointFormatError(f"{path}: block {i} is missing ({block_path}); re-run the conversion")
        for key, value in _flatten(_dequantize_tree(_restore_tree(block_path))).items():
            full = ("blocks", *key)
            if full not in targets:
                raise CheckpointFormatError(f"{path}: unexpected parameter blocks.{i}.{'.'.join(key)}")
            if tuple(value.shape) != tuple(targets[full].shape[1:]):
                raise CheckpointFormatError(
                    f"{path}: parameter blocks.{i}.{'.'.join(key)} has shape {value.shape}, the model needs "
                    f"{targets[full].shape[1:]}"
                )
            if full not in stacked:
                stacked[full] = np.empty(targets[full].shape, targets[full].dtype)
            stacked[full][i] = np.asarray(value).astype(targets[full].dtype)
    for key in list(stacked):
        values[key] = put(key, stacked.pop(key))

    missing = sorted(".".join(map(str, k)) for k in targets if k not in values)
    if missing:
        raise CheckpointFormatError(f"{path}: missing parameters: {', '.join(missing)}")
    state = nnx.from_flat_state([(k, targets[k].replace(values[k])) for k in targets])
    return nnx.merge(graphdef, state)
