"""Torch-free checkpoint readers: exact round trips, zero-copy, refusal of hostile or broken files."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from convert.errors import CheckpointError
from convert.pth import load_pth
from convert.safetensors_io import load_safetensors, load_safetensors_index

FIXTURES = Path(__file__).parent / "fixtures" / "readers"


def _expected() -> dict[str, np.ndarray]:
    """expected.npz with each entry in its true dtype (see make_reader_fixtures.py)."""
    npz = np.load(FIXTURES / "expected.npz")
    dtypes = dict(line.split("=") for line in npz["__dtypes__"])
    return {key: npz[key].view(np.dtype(name)) for key, name in dtypes.items()}


EXPECTED = _expected()


def _flatten(obj, prefix: str) -> dict[str, np.ndarray]:
    if isinstance(obj, np.ndarray):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    return {k: v for key, value in items for k, v in _flatten(value, f"{prefix}/{key}").items()}


def _assert_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape)
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def _is_memmap_view(a: np.ndarray) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _refused(load, path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)


# --- a torch.save zip, built by hand (the tests must not import torch) ---

def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)  # BININT


def _ints(values) -> bytes:
    return b"(" + b"".join(map(_int, values)) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor_pickle(size, numel=None, key="0", storage="FloatStorage") -> bytes:
    """data.pkl of {"w": tensor} with the opcodes torch.save emits (protocol 2, _rebuild_tensor_v2)."""
    numel = math.prod(size) if numel is None else numel
    stride = [math.prod(size[i + 1 :]) for i in range(len(size))]
    storage_id = b"(" + _str("storage") + _global("torch", storage) + _str(key) + _str("cpu") + _int(numel)
    storage_id += b"t"
    args = (
        storage_id + b"Q"  # BINPERSID
        + _int(0) + _ints(size) + _ints(stride)
        + b"\x89" + _global("collections", "OrderedDict") + b")R"  # requires_grad=False, OrderedDict()
    )
    tensor = _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
    return b"\x80\x02}(" + _str("w") + tensor + b"u."


def _write_torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes], byteorder=b"little",
                     compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", byteorder)
        for key, payload in records.items():
            zf.writestr(f"archive/data/{key}", payload, compress_type=compression)
        zf.writestr("archive/version", b"3\n")
    return path


# --- .pth: round trips ---

@pytest.mark.parametrize("name", ["dtypes", "layout", "nested", "module"])
def test_pth_fixture_loads_exactly_as_torch_saved_it(name):
    loaded = _flatten(load_pth(FIXTURES / f"{name}.pth"), name)
    assert sorted(loaded) == sorted(k for k in EXPECTED if k.startswith(f"{name}/"))
    for key, array in loaded.items():
        _assert_identical(array, EXPECTED[key])
        assert _is_memmap_view(array), key
        assert not array.flags.writeable, key


def test_pth_dtypes_fixture_covers_every_dtype():
    names = {a.dtype.name for a in load_pth(FIXTURES / "dtypes.pth").values()}
    floats = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
    ints = {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"}
    assert names == floats | ints | {"bool", "complex64", "complex128"}


def test_pth_views_keep_strides_offsets_and_sharing():
    layout = load_pth(FIXTURES / "layout.pth")
    assert layout["transposed"].strides == (4, 16)
    assert layout["col_slice"].strides == (32, 4) and not layout["col_slice"].flags.c_contiguous
    assert layout["row_slice"][0, 0] == 16
    assert np.shares_memory(layout["shared_a"], layout["shared_b"])
    assert layout["scalar"].shape == () and layout["scalar"] == 3.25
    assert layout["int8_scalar"] == -7


def test_pth_nested_containers_keep_their_structure():
    nested = load_pth(FIXTURES / "nested.pth")
    assert nested["step"] == 3
    assert nested["meta"] == {"lr": 1e-4, "name": "wan", "shape": [2, 3], "pair": (1, None), "flag": True}
    assert list(nested["state_dict"]) == ["blocks.0.weight", "blocks.0.bias"]
    assert isinstance(nested["tensors"], list) and isinstance(nested["tensors"][1], tuple)


def test_pth_module_state_dict_drops_its_metadata():
    """torch.save(module.state_dict()) pickles an OrderedDict with a _metadata attribute (restored by BUILD)."""
    sd = load_pth(FIXTURES / "module.pth")
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    assert isinstance(sd, dict) and not hasattr(sd, "_metadata")


def test_pth_hand_built_zip_loads(tmp_path):
    values = np.arange(6, dtype=np.float32)
    path = _write_torch_zip(tmp_path / "w.pth", _tensor_pickle([2, 3]), {"0": values.tobytes()})
    np.testing.assert_array_equal(load_pth(path)["w"], values.reshape(2, 3))


# --- .pth: hostile pickles ---

def _pickled_args(args: tuple) -> bytes:
    return pickle.dumps(args, protocol=2)[2:-1]  # the opcodes that push `args`, without PROTO and STOP


def _reduce_global(module, name, args) -> bytes:
    return b"\x80\x02" + _global(module, name) + _pickled_args(args) + b"R."


def _short_str(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE


def _reduce_stack_global(module, name, args) -> bytes:
    return b"\x80\x04" + _short_str(module) + _short_str(name) + b"\x93" + _pickled_args(args) + b"R."


def _inst(module, name, args) -> bytes:
    """Protocol 0: MARK, the args as UNICODE lines, INST module name."""
    pushed = b"".join(b"V" + a.encode() + b"\n" for a in args)
    return b"(" + pushed + b"i" + f"{module}\n{name}\n".encode() + b"."


class _Evil:
    """The classic payload, as pickle itself writes it (GLOBAL 'posix system', REDUCE)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    return {
        "posix.system": _reduce_global("posix", "system", (touch,)),
        "os.system": _reduce_global("os", "system", (touch,)),
        "builtins.eval": _reduce_global("builtins", "eval", (f"__import__('os').system({touch!r})",)),
        "builtins.exec": _reduce_global("builtins", "exec", (f"import os; os.system({touch!r})",)),
        "subprocess.Popen": _reduce_global("subprocess", "Popen", (["touch", str(marker)],)),
        "stack_global": _reduce_stack_global("os", "system", (touch,)),
        "dotted_name": _reduce_stack_global("torch._utils", "_rebuild_tensor_v2.__globals__", ()),
        "inst_opcode": _inst("os", "system", (touch,)),
        "inside_state_dict": pickle.dumps({"state_dict": {"w": _Evil(touch)}, "step": 3}, protocol=2),
        "torch_load": _reduce_global("torch", "load", (str(marker),)),
    }


@pytest.mark.parametrize("variant", sorted(_hostile_pickles(Path("x"))))
def test_pth_hostile_pickle_is_refused_and_never_runs(tmp_path, variant):
    marker = tmp_path / "pwned"
    path = _write_torch_zip(tmp_path / "evil.pth", _hostile_pickles(marker)[variant], {})
    _refused(load_pth, path, "refusing to load global")
    assert not marker.exists()


def test_pth_build_cannot_retarget_an_allowed_global(tmp_path):
    # BUILD (None, {"fn": OrderedDict}) on the _rebuild_tensor_v2 token
    state = b"N}" + _str("fn") + _global("collections", "OrderedDict") + b"s\x86"  # (None, {"fn": ...})
    tamper = b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + state + b"b."  # BUILD
    path = _write_torch_zip(tmp_path / "t.pth", tamper, {})
    _refused(load_pth, path, "corrupt")
    _assert_identical(load_pth(FIXTURES / "layout.pth")["param"], EXPECTED["layout/param"])


def test_pth_unknown_persistent_id_is_refused(tmp_path):
    path = _write_torch_zip(tmp_path / "p.pth", b"\x80\x02" + _str("/etc/passwd") + b"Q.", {})
    _refused(load_pth, path, "unexpected persistent id")


# --- .pth: broken files ---

@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_pth_truncated_file_is_refused(tmp_path, keep):
    data = (FIXTURES / "layout.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    _refused(load_pth, path, "truncated")


def test_pth_record_shorter_than_its_storage_is_refused(tmp_path):
    path = _write_torch_zip(tmp_path / "s.pth", _tensor_pickle([4]), {"0": bytes(8)})
    _refused(load_pth, path, "holds 8 bytes but its storage needs 16")


def test_pth_tensor_beyond_its_storage_is_refused(tmp_path):
    path = _write_torch_zip(tmp_path / "s.pth", _tensor_pickle([5], numel=4), {"0": bytes(16)})
    _refused(load_pth, path, "does not fit its 16-byte storage")


def test_pth_missing_storage_record_is_refused(tmp_path):
    path = _write_torch_zip(tmp_path / "m.pth", _tensor_pickle([4]), {})
    _refused(load_pth, path, "archive/data/0 is missing")


def test_pth_compressed_record_is_refused(tmp_path):
    path = _write_torch_zip(
        tmp_path / "c.pth", _tensor_pickle([4]), {"0": bytes(16)}, compression=zipfile.ZIP_DEFLATED
    )
    _refused(load_pth, path, "compressed")


def test_pth_big_endian_is_refused(tmp_path):
    path = _write_torch_zip(tmp_path / "b.pth", _tensor_pickle([4]), {"0": bytes(16)}, byteorder=b"big")
    _refused(load_pth, path, "big-endian")


def test_pth_legacy_format_is_refused_with_the_fix():
    _refused(load_pth, FIXTURES / "legacy.pth", "legacy .*_use_new_zipfile_serialization=True")


def test_pth_other_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _refused(load_pth, tmp_path / "notes.txt", "not a PyTorch checkpoint")
    _refused(load_pth, tmp_path / "absent.pth", "cannot open")


# --- safetensors ---

def test_safetensors_fixture_from_safetensors_torch_loads_exactly():
    loaded = load_safetensors(FIXTURES / "dtypes.safetensors")
    assert len(loaded) == 16
    for name, array in loaded.items():
        _assert_identical(array, EXPECTED[f"dtypes/{name}"])
        assert _is_memmap_view(array) and not array.flags.writeable


def test_safetensors_numpy_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (2, 2)),
        "u8": rng.integers(0, 255, 9, dtype=np.uint8),
        "bool": rng.random(4) > 0.5,
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), np.int32),
    }
    path = tmp_path / "n.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})
    loaded = load_safetensors(path)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        _assert_identical(loaded[name], array)


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], pad_header_to=8) -> Path:
    """A safetensors file by hand: name -> (dtype string, array)."""
    header, offset = {"__metadata__": {"by": "hand"}}, 0
    for name, (dtype, array) in tensors.items():
        span = [offset, offset + array.nbytes]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": span}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_header_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    return path


def test_safetensors_hand_written_bf16_and_fp8(tmp_path):
    values = np.array([[1.5, -2.0, 0.0], [3.25, np.inf, -0.5]], dtype=np.float32)
    tensors = {
        "bf16": ("BF16", values.astype(ml_dtypes.bfloat16)),
        "fp8": ("F8_E4M3", values[:, :2].astype(ml_dtypes.float8_e4m3fn)),
        "f64": ("F64", values.astype(np.float64)),
    }
    loaded = load_safetensors(_write_safetensors(tmp_path / "h.safetensors", tensors))
    for name, (_, array) in tensors.items():
        _assert_identical(loaded[name], array)


@pytest.mark.parametrize("keep", [4, 20, -1])
def test_safetensors_truncated_file_is_refused(tmp_path, keep):
    whole = _write_safetensors(tmp_path / "t.safetensors", {"w": ("F32", np.ones(64, np.float32))})
    data = whole.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    _refused(load_safetensors, path, "truncated")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "spans 8 bytes but F32\\[3\\] needs 12"),
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "malformed"),
        ({"dtype": "F32", "data_offsets": [0, 4]}, "malformed"),
    ],
)
def test_safetensors_bad_header_entry_is_refused(tmp_path, entry, match):
    raw = json.dumps({"w": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    _refused(load_safetensors, path, match)


def _write_shards(tmp_path: Path) -> Path:
    a, b = np.arange(4, dtype=np.float32), np.full((2, 2), 7, np.int16)
    safetensors.numpy.save_file({"a": a}, tmp_path / "m-00001-of-00002.safetensors")
    safetensors.numpy.save_file({"b": b, "unlisted": a}, tmp_path / "m-00002-of-00002.safetensors")
    weight_map = {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 24}, "weight_map": weight_map}))
    return index


def test_safetensors_index_merges_shards(tmp_path):
    loaded = load_safetensors_index(_write_shards(tmp_path))
    assert sorted(loaded) == ["a", "b"]
    _assert_identical(loaded["a"], np.arange(4, dtype=np.float32))
    _assert_identical(loaded["b"], np.full((2, 2), 7, np.int16))
    assert all(_is_memmap_view(a) for a in loaded.values())


def test_safetensors_index_missing_shard_is_named(tmp_path):
    index = _write_shards(tmp_path)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    _refused(load_safetensors_index, index, "m-00002-of-00002.safetensors .*missing")


def test_safetensors_index_tensor_missing_from_its_shard(tmp_path):
    index = _write_shards(tmp_path)
    weight_map = {"a": "m-00001-of-00002.safetensors", "ghost": "m-00001-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    _refused(load_safetensors_index, index, "'ghost'")


# --- streaming: a big checkpoint costs no RSS until touched ---

_BIG = 300 * 2**20


def _assert_streams(load, path: Path, key: str) -> None:
    before = _rss_bytes()
    array = load(path)[key]
    assert array.nbytes == _BIG
    assert _rss_bytes() - before < 32 * 2**20
    assert _is_memmap_view(array)
    touched = array[: 64 * 2**20 // array.itemsize]
    assert int(touched[-1]) == len(touched) - 1 and touched.sum() > 0  # reads 64 MB, which RSS must show
    assert _rss_bytes() - before > 48 * 2**20


def _big_payload_chunks():
    chunk = 16 * 2**20 // 4
    for start in range(0, _BIG // 4, chunk):
        yield np.arange(start, start + chunk, dtype=np.int32).tobytes()


def test_safetensors_streams(tmp_path):
    raw = json.dumps({"w": {"dtype": "I32", "shape": [_BIG // 4], "data_offsets": [0, _BIG]}}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.writelines(_big_payload_chunks())
    _assert_streams(load_safetensors, path, "w")


def test_pth_streams(tmp_path):
    path = _write_torch_zip(tmp_path / "big.pth", _tensor_pickle([_BIG // 4], storage="IntStorage"), {})
    with zipfile.ZipFile(path, "a") as zf, zf.open("archive/data/0", "w", force_zip64=True) as record:
        record.writelines(_big_payload_chunks())
    _assert_streams(load_pth, path, "w")


def test_pth_compressed_data_pkl_is_refused(tmp_path):
    path = tmp_path / "zipbomb.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00." + b"\x00" * 10_000, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("archive/byteorder", b"little")
    with pytest.raises(CheckpointError, match="compressed"):
        load_pth(path)
