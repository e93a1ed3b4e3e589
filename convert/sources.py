"""Resolving the SRC arguments of turbojax-convert into one flat dict of zero-copy tensors (+ an adjacent config.json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert.errors import CheckpointError
from convert.pth import load_pth
from convert.safetensors_io import load_safetensors, load_safetensors_index

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Containers that training scripts wrap a state dict in ({"state_dict": {...}}, DCP exports' "net_ema", ...).
WRAPPER_KEYS = ("state_dict", "model", "module", "net_ema", "ema")


def _files_in(directory: Path) -> list[Path]:
    index = sorted(directory.glob("*.safetensors.index.json"))
    if len(index) == 1:
        return index
    found = sorted(directory.glob("*.safetensors")) + sorted(p for s in PTH_SUFFIXES for p in directory.glob(f"*{s}"))
    if len(found) == 1:
        return found
    if not found:
        experts = [d.name for d in sorted(directory.iterdir())
                   if d.name in ("high_noise_model", "low_noise_model", "transformer", "transformer_2")]
        if experts:
            raise CheckpointError(
                f"{directory} holds a model per subfolder ({', '.join(experts)}); convert each one into its own "
                f"--out folder, e.g. turbojax-convert {directory / experts[0]} --out ckpt/{experts[0]}"
            )
        raise CheckpointError(f"{directory} holds no .safetensors, index .json or .pth checkpoint")
    raise CheckpointError(
        f"{directory} holds several checkpoint files ({', '.join(p.name for p in found)}); name the file(s) to convert"
    )


def resolve(sources: list[str]) -> tuple[list[Path], dict | None]:
    """Checkpoint files to read, and the config.json that sits beside them (if any)."""
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise CheckpointError(f"{src}: no such file or directory")
        files.extend(_files_in(p) if p.is_dir() else [p])
    config_json = None
    cfg_path = files[0].parent / "config.json"
    if cfg_path.is_file():
        try:
            config_json = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config_json, dict):
            raise CheckpointError(f"{cfg_path} holds a JSON {type(config_json).__name__}, not an object; fix or "
                                  "remove it")
    return files, config_json


MAX_NESTING = 32  # real checkpoints nest a state dict 1-3 levels deep


def _flatten(obj, prefix: str, out: dict[str, np.ndarray], source: Path, depth: int = 0) -> None:
    if depth > MAX_NESTING:
        raise CheckpointError(f"{source}: containers nested over {MAX_NESTING} deep at {prefix[:80]!r}; not a state "
                              "dict")
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, source, depth + 1)
    elif prefix.endswith(("_extra_state",)) or isinstance(obj, (int, float, str, type(None))):
        return  # bookkeeping values (step counters, versions) beside the weights
    else:
        raise CheckpointError(f"{source}: entry {prefix!r} is a {type(obj).__name__}, not a tensor or dict of tensors")


def _unwrap(obj):
    """{"state_dict": {...}} and friends -> the inner dict of tensors."""
    while isinstance(obj, dict):
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if not inner or any(isinstance(v, np.ndarray) for v in obj.values()):
            return obj
        obj = obj[inner[0]]
    return obj


def read_file(path: Path) -> dict[str, np.ndarray]:
    name = path.name
    if name.endswith(".safetensors.index.json") or name.endswith(".index.json"):
        return load_safetensors_index(path)
    if name.endswith(".safetensors"):
        return load_safetensors(path)
    if name.endswith(PTH_SUFFIXES):
        obj = _unwrap(load_pth(path))
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        out: dict[str, np.ndarray] = {}
        _flatten(obj, "", out, path)
        return out
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .pth, .safetensors or a safetensors index .json")


def read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    """All tensors of the given files as one dict; a key found in two files is an error."""
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_file(f).items():
            if k in tensors:
                raise CheckpointError(f"key {k} appears in more than one source file (second: {f})")
            tensors[k] = v
    return tensors


def source_files(files: list[Path]) -> list[Path]:
    """The files whose bytes make up the checkpoint (an index's shards rather than the index)."""
    out = []
    for f in files:
        if f.name.endswith(".index.json"):
            weight_map = json.loads(f.read_text()).get("weight_map", {})
            out.extend(f.parent / s for s in sorted(set(weight_map.values())))
        else:
            out.append(f)
    return out


def sha256_files(files: list[Path], progress: bool = True) -> dict[str, str]:
    """sha256 of each file by name (by path where two share a name), streamed in 16 MB reads."""
    total = sum(f.stat().st_size for f in files)
    names = [f.name for f in files]
    digests = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing sources", disable=not progress) as bar:
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
                    bar.update(len(chunk))
            digests[f.name if names.count(f.name) == 1 else str(f)] = h.hexdigest()
    return digests
