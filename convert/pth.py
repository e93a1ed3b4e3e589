"""Torch-free, zero-copy reader for checkpoints written by ``torch.save`` (zip format, torch>=1.6).

Tensors come back as read-only numpy views into a memory map of the file, so a 28 GB checkpoint
costs no RAM until values are touched. The pickle runs under an unpickler that knows only the
globals ``torch.save`` emits for state dicts; anything else is refused, never executed.
Big-endian checkpoints are refused rather than byteswapped (a swap would need a copy).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, NamedTuple

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

# Zip local file header: signature, 22 bytes we skip, file name length, extra field length.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"

# torch.save names the legacy storage class of every dtype that has one (_rebuild_tensor_v2) ...
_STORAGE_CLASSES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
# ... and saves the other dtypes as an UntypedStorage plus a `torch.<dtype>` global (_rebuild_tensor_v3).
_UNTYPED_DTYPES = {
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}


# Everything find_class and persistent_load hand out is an immutable NamedTuple: a BUILD opcode can
# neither __setstate__ nor setattr it, so a pickle cannot retarget an allowed global for later loads.
# (A frozen slotted dataclass would not do: dataclasses give those a __setstate__.)
class _StorageType(NamedTuple):
    dtype: np.dtype  # uint8 for UntypedStorage, whose numel counts bytes


class _Dtype(NamedTuple):
    dtype: np.dtype


class _Function(NamedTuple):
    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _Storage(NamedTuple):
    data: np.ndarray  # the storage's bytes: a uint8 slice of the file's memmap
    dtype: np.dtype


def _check_metadata(metadata: Any) -> None:
    if metadata:  # torch only records lazy conj/neg bits here, which a numpy view cannot carry
        raise CheckpointError(
            f"a tensor has lazy conj/neg bits {metadata!r:.100}; "
            "re-save it after tensor.resolve_conj().resolve_neg()"
        )


def _as_storage(storage: Any) -> _Storage:
    if not isinstance(storage, _Storage):
        raise CheckpointError("data.pkl is corrupt: a tensor is rebuilt without a storage")
    return storage


def _view(storage: _Storage, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> np.ndarray:
    itemsize = dtype.itemsize
    try:
        return np.ndarray(
            tuple(size),
            dtype=dtype,
            buffer=storage.data,
            offset=offset * itemsize,
            strides=tuple(s * itemsize for s in stride),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"data.pkl is corrupt: a tensor (size {size!r:.80}, stride {stride!r:.80}, offset "
            f"{offset!r:.20}) does not fit its {storage.data.size}-byte storage"
        ) from e


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata)
    storage = _as_storage(storage)
    return _view(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    _check_metadata(metadata)
    if not isinstance(dtype, _Dtype):
        raise CheckpointError(f"data.pkl is corrupt: {dtype!r:.80} is not a dtype")
    return _view(_as_storage(storage), storage_offset, size, stride, dtype.dtype)


class _StateDict(dict):
    """What an OrderedDict loads as. nn.Module.state_dict() returns one carrying a `_metadata` attribute (module
    versions), which pickle restores with a BUILD opcode; it means nothing here and is dropped."""

    def __setstate__(self, state) -> None:
        pass


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _Function(_StateDict),
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Function(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter_with_state),
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    **{("torch", name): _StorageType(np.dtype(t)) for name, t in _STORAGE_CLASSES.items()},
    **{("torch", name): _Dtype(np.dtype(t)) for name, t in _UNTYPED_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], load_storage: Callable[[_StorageType, str, int], _Storage]):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise CheckpointError(
                f"refusing to load global '{module}.{name}': only tensors, containers and numbers "
                "of a torch state dict are allowed. If you trust the file, re-save just the state "
                "dict with torch.save(model.state_dict(), path) or convert it to safetensors"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        match pid:
            case ("storage", _StorageType() as storage_type, str() as key, _, int() as numel) if numel >= 0:
                return self._load_storage(storage_type, key, numel)
        raise CheckpointError(f"data.pkl is corrupt: unexpected persistent id {pid!r:.200}")


def load_pth(path: str | Path) -> object:
    """Load a torch.save checkpoint as saved, with tensors as read-only memmap-backed arrays.

    Containers keep their nesting; OrderedDicts come back as plain (insertion-ordered) dicts.
    """
    path = Path(path)
    try:
        return _load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load(path: Path) -> object:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror}") from e
    with f, _open_zip(f) as zf:
        prefix = _archive_prefix(zf)
        _check_byteorder(zf, prefix)
        data_pkl = _read_record(zf, prefix + "data.pkl")
        load_storage = _storage_loader(f, zf, prefix, np.memmap(f, dtype=np.uint8, mode="r"))
        return _unpickle(data_pkl, load_storage)


def _open_zip(f: IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError):
        f.seek(0)
        raise CheckpointError(_not_a_zip_reason(f.read(4))) from None


def _not_a_zip_reason(head: bytes) -> str:
    if head.startswith(b"\x80"):  # a pickle protocol opcode: torch's legacy (pre-1.6) format
        return (
            "this is the legacy (non-zip) torch.save format, which is not supported; re-save it "
            "with torch>=1.6: torch.save(torch.load(old, weights_only=True), new, "
            "_use_new_zipfile_serialization=True)"
        )
    if head == _LOCAL_HEADER_SIGNATURE:
        return "the zip central directory is missing: the file is truncated or corrupt; download it again"
    return "not a PyTorch checkpoint (expected the zip format written by torch.save)"


def _archive_prefix(zf: zipfile.ZipFile) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError("no single <archive>/data.pkl record: this zip is not a torch.save checkpoint")
    return pickles[0].removesuffix("data.pkl")


def _read_record(zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"record {name} is missing: the file is truncated or corrupt") from None
    # torch.save stores every record uncompressed; a compressed one could inflate to any size before we look at it.
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"record {name} is compressed, which torch.save never does: not a torch checkpoint")
    try:
        return zf.read(name)
    except KeyError:
        raise CheckpointError(f"record {name} is missing: the file is truncated or corrupt") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"record {name} is unreadable ({e}): the file is truncated or corrupt") from e


def _check_byteorder(zf: zipfile.ZipFile, prefix: str) -> None:
    name = prefix + "byteorder"
    if name not in zf.NameToInfo:  # older torch wrote none; torch.load reads those as little-endian too
        return
    byteorder = _read_record(zf, name)
    if byteorder == b"big":
        raise CheckpointError(
            "it was saved on a big-endian machine, which is not supported; "
            "re-save it with torch.save on a little-endian (x86/ARM) machine"
        )
    if byteorder != b"little":
        raise CheckpointError(f"record {name} holds {byteorder!r:.40}, not little/big: the file is corrupt")


def _storage_loader(
    f: IO[bytes], zf: zipfile.ZipFile, prefix: str, mm: np.memmap
) -> Callable[[_StorageType, str, int], _Storage]:
    records: dict[str, np.ndarray] = {}

    def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
        name = f"{prefix}data/{key}"
        if name not in records:
            records[name] = _record_bytes(f, zf, mm, name)
        data = records[name]
        nbytes = numel * storage_type.dtype.itemsize
        if data.size < nbytes:
            raise CheckpointError(
                f"record {name} holds {data.size} bytes but its storage needs {nbytes}: "
                "the file is truncated or corrupt; download it again"
            )
        return _Storage(data[:nbytes], storage_type.dtype)

    return load_storage


def _record_bytes(f: IO[bytes], zf: zipfile.ZipFile, mm: np.memmap, name: str) -> np.ndarray:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"record {name} is missing: the file is truncated or corrupt") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"record {name} is compressed, which torch.save never does, so it cannot be memory-mapped; "
            "re-save the checkpoint with torch.save (or re-zip it uncompressed, `zip -0`)"
        )
    start = _data_offset(f, info)
    data = mm[start : start + info.file_size]
    if data.size < info.file_size:
        raise CheckpointError(
            f"record {name} runs past the end of the file: the file is truncated; download it again"
        )
    return data


def _data_offset(f: IO[bytes], info: zipfile.ZipInfo) -> int:
    # Read the local header: its extra field (torch pads it to align storages) can differ from the
    # central directory's.
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_HEADER_SIGNATURE:
        raise CheckpointError(f"record {info.filename} has no valid zip local header: the file is corrupt")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _unpickle(data: bytes, load_storage: Callable[[_StorageType, str, int], _Storage]) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()
    except CheckpointError:
        raise
    except Exception as e:  # any malformed pickle, whatever the opcode that trips on it
        raise CheckpointError(f"data.pkl is corrupt ({type(e).__name__}: {e})") from e
