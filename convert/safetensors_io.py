"""Zero-copy reader for safetensors files and sharded sets (``*.safetensors.index.json``).

Tensors come back as read-only numpy views into a memory map of the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_HEADER_LENGTH = struct.Struct("<Q")
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Map a .safetensors file; returns name -> read-only memmap-backed array (skips ``__metadata__``)."""
    path = Path(path)
    try:
        return _load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_safetensors_index(index_json_path: str | Path) -> dict[str, np.ndarray]:
    """Map every shard of a sharded set; returns one dict over all tensors of its ``weight_map``."""
    path = Path(index_json_path)
    try:
        weight_map = _read_weight_map(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    missing = sorted({shard for shard in weight_map.values() if not (path.parent / shard).is_file()})
    if missing:
        raise CheckpointError(
            f"{path}: shard file(s) {', '.join(missing)} listed in weight_map are missing from "
            f"{path.parent}; download them"
        )
    shards = {shard: load_safetensors(path.parent / shard) for shard in set(weight_map.values())}
    return {name: _shard_tensor(path, shards[shard], shard, name) for name, shard in weight_map.items()}


def _shard_tensor(path: Path, shard: dict[str, np.ndarray], shard_name: str, name: str) -> np.ndarray:
    try:
        return shard[name]
    except KeyError:
        raise CheckpointError(
            f"{path}: weight_map puts {name!r} in {shard_name}, which has no such tensor: "
            "the shards do not match the index; download the set again"
        ) from None


def _read_weight_map(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror}") from e
    except ValueError as e:
        raise CheckpointError(f"not valid JSON ({e}): not a safetensors index or corrupt") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError("no weight_map of tensor name -> shard file: not a safetensors index")
    outside = sorted({v for v in weight_map.values() if Path(v).name != v})
    if outside:
        raise CheckpointError(f"weight_map names shard files outside the index's folder ({outside[0]}); shards must "
                              "be plain file names beside the index")
    return weight_map


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < _HEADER_LENGTH.size:
                raise CheckpointError(
                    "shorter than the 8-byte header length: truncated or not a safetensors file"
                )
            mm = np.memmap(f, dtype=np.uint8, mode="r")
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror}") from e
    header, data_start = _read_header(mm)
    return {
        name: _tensor(mm, data_start, name, entry) for name, entry in header.items() if name != "__metadata__"
    }


def _read_header(mm: np.memmap) -> tuple[dict[str, Any], int]:
    (length,) = _HEADER_LENGTH.unpack(mm[: _HEADER_LENGTH.size].tobytes())
    available = mm.size - _HEADER_LENGTH.size
    if length > min(available, _MAX_HEADER_BYTES):
        raise CheckpointError(
            f"the header claims {length} bytes but the file has {available} after the length: "
            "truncated or not a safetensors file"
        )
    data_start = _HEADER_LENGTH.size + length
    try:
        header = json.loads(mm[_HEADER_LENGTH.size : data_start].tobytes())
    except ValueError as e:
        raise CheckpointError(f"the header is not valid JSON ({e}): corrupt or not a safetensors file") from e
    if not isinstance(header, dict):
        raise CheckpointError("the header is not a JSON object: corrupt or not a safetensors file")
    return header, data_start


def _tensor(mm: np.memmap, data_start: int, name: str, entry: Any) -> np.ndarray:
    match entry:
        case {
            "dtype": str() as dtype_name,
            "shape": list() as shape,
            "data_offsets": [int() as begin, int() as end],
        }:
            pass
        case _:
            raise CheckpointError(f"tensor {name!r} has a malformed header entry {entry!r:.200}")
    if dtype_name not in _DTYPES:
        raise CheckpointError(f"tensor {name!r} has unsupported dtype {dtype_name!r:.40}")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"tensor {name!r} has a malformed header entry {entry!r:.200}")
    dtype = np.dtype(_DTYPES[dtype_name])
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"tensor {name!r} spans {end - begin} bytes but {dtype_name}{shape} needs {nbytes}: "
            "the file is corrupt"
        )
    if data_start + end > mm.size:
        raise CheckpointError(
            f"tensor {name!r} ends at byte {data_start + end} but the file has {mm.size}: "
            "the file is truncated; download it again"
        )
    return np.ndarray(tuple(shape), dtype=dtype, buffer=mm, offset=data_start + begin)
