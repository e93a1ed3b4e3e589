"""turbojax-convert: layout/preset/quantisation detection, renames, refusals, the written folder, and streaming.

Real-size checks use zero-byte tensor views (np.broadcast_to of a scalar), so a 14B key set costs no memory. Bad
checkpoints are derived at test time from the golden fixtures of tests/fixtures/dit (see its README.md); .pth files
are written by hand in the torch.save zip layout (these tests must not import torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import threading
import time
import zipfile
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import turbojax
from convert import layouts
from convert.cli import convert, main
from convert.errors import CheckpointError
from convert.pth import load_pth
from convert.safetensors_io import load_safetensors, load_safetensors_index
from turbojax import checkpoint
from turbojax.models.config import PRESETS, WanConfig

FIXTURES = Path(__file__).parent / "fixtures" / "dit"
WAN_ST = FIXTURES / "wan_t2v" / "diffusion_pytorch_model.safetensors"
TURBO_PTH = FIXTURES / "turbo_t2v" / "turbo_t2v.pth"
QUANT_PTH = FIXTURES / "turbo_t2v_quant" / "turbo_t2v_quant.pth"
DIFFUSERS_DIR = FIXTURES / "diffusers_t2v"
DIFFUSERS_INDEX = DIFFUSERS_DIR / "diffusion_pytorch_model.safetensors.index.json"
REAL_PRESETS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-i2v-a14b")


# --- helpers -------------------------------------------------------------------------------------------------------

def _zero_views(shapes: dict[str, tuple[int, ...]], dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """Zero-byte stand-ins for a checkpoint of any size."""
    return {k: np.broadcast_to(np.zeros((), dtype), s) for k, s in shapes.items()}


def _stock(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A TurboDiffusion-layout key set as stock Wan would store it: Conv3d patch embedding, no proj_l."""
    out = {k: v for k, v in tensors.items() if layouts.PROJ_L not in k}
    w = out["patch_embedding.weight"]
    out["patch_embedding.weight"] = np.broadcast_to(np.zeros((), w.dtype), (w.shape[0], w.shape[1] // 4, 1, 2, 2))
    return out


# Wan -> diffusers, written from the spec's table (wan-model.md 8.2), independently of layouts.DIFFUSERS_RENAMES.
_TO_DIFFUSERS = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"^(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"^(blocks\.\d+)\.self_attn\.(norm_[qk])\.", r"\1.attn1.\2."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"^(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.(norm_[qk])\.", r"\1.attn2.\2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
]


def _diffusers_name(key: str) -> str:
    for pattern, repl in _TO_DIFFUSERS:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key  # patch_embedding.* keeps its name


def _save_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return path


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A torch.save zip, by hand: the opcodes torch emits (protocol 2, _rebuild_tensor_v2, one storage per tensor).
_STORAGE = {"float32": "FloatStorage", "bfloat16": "BFloat16Storage", "int8": "CharStorage", "float16": "HalfStorage"}


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)  # BININT


def _ints(values) -> bytes:
    return b"(" + b"".join(map(_int, values)) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _pickle_value(obj, records: dict[str, bytes]) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_str(k) + _pickle_value(v, records) for k, v in obj.items()) + b"u"
    if isinstance(obj, int):
        return _int(obj)
    a = np.ascontiguousarray(obj)
    key = str(len(records))
    records[key] = a.tobytes()
    stride = [math.prod(a.shape[i + 1:]) for i in range(a.ndim)]
    storage = b"(" + _str("storage") + _global("torch", _STORAGE[a.dtype.name]) + _str(key) + _str("cpu")
    storage += _int(a.size) + b"tQ"  # TUPLE, BINPERSID
    args = storage + _int(0) + _ints(a.shape) + _ints(stride) + b"\x89" + _global("collections", "OrderedDict") + b")R"
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def _write_torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = path.stem
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", b"little")
        for key, payload in records.items():
            zf.writestr(f"{prefix}/data/{key}", payload)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def _save_pth(path: Path, obj: dict) -> Path:
    records: dict[str, bytes] = {}
    return _write_torch_zip(path, b"\x80\x02" + _pickle_value(obj, records) + b".", records)


def _blocks_and_embeddings(folder: Path) -> dict[str, dict]:
    out = {"embeddings": checkpoint._restore_tree(folder / "params" / "embeddings")}
    for d in sorted((folder / "params" / "blocks").iterdir()):
        out[d.name] = checkpoint._restore_tree(d)
    return out


def _assert_same_params(a: Path, b: Path) -> None:
    ta, tb = _blocks_and_embeddings(a), _blocks_and_embeddings(b)
    fa, fb = checkpoint._flatten(ta), checkpoint._flatten(tb)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def _refused(capsys, tmp_path: Path, srcs, *extra: str, out: Path | None = None) -> str:
    """Runs the CLI, expects exit 2 with one `turbojax-convert: error:` line; returns it. No --out, no temp left."""
    out = out or tmp_path / "ckpt"
    existed = out.exists()
    capsys.readouterr()
    rc = main([*map(str, srcs), "--out", str(out), "--quiet", *extra])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("turbojax-convert: error: ")
    assert captured.out == ""
    assert out.exists() == existed
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    return lines[0]


# --- 1. preset detection at real sizes (zero-byte views) ----------------------------------------------------------

@pytest.mark.parametrize("preset", REAL_PRESETS)
@pytest.mark.parametrize("variant", ["turbo", "turbo-quant", "stock"])
def test_real_size_preset_detection(preset, variant):
    want = PRESETS[preset]
    quantized = variant == "turbo-quant"
    tensors = _zero_views(layouts.expected_shapes(want, quantized))
    if variant == "stock":
        tensors = _stock(tensors)
        assert tensors["patch_embedding.weight"].shape == (want.dim, want.in_dim, 1, 2, 2)
    layout = layouts.detect_layout(tensors)
    assert layout == ("wan" if variant == "stock" else "turbodiffusion")
    canonical = layouts.to_canonical(tensors, layout)
    assert canonical["patch_embedding.weight"].shape == (want.dim, 4 * want.in_dim)
    det = layouts.infer_config(canonical, layout)
    assert det.preset == preset
    assert det.quantized == quantized
    assert det.config.num_heads == want.num_heads == want.dim // 128
    assert det.config.in_dim == (36 if "i2v" in preset else 16)
    assert det.config.sla_proj == (variant != "stock")
    assert det.config.family == ("wan" if variant == "stock" else "turbodiffusion")
    assert det.config == want.replace(sla_proj=det.config.sla_proj, family=det.config.family)
    layouts.validate(canonical, det.config, det.quantized)
    with pytest.raises(CheckpointError):  # the other quantisation's key set is not accepted
        layouts.validate(canonical, det.config, not det.quantized)


def test_heads_come_from_proj_l_before_the_preset_width():
    # dim 1536 is the 1.3B width (12 heads), but proj_l [64, 64] says 24 heads of 64.
    cfg = PRESETS["wan2.1-t2v-1.3b"].replace(num_heads=24)
    det = layouts.infer_config(_zero_views(layouts.expected_shapes(cfg, False)), "turbodiffusion")
    assert det.config.num_heads == 24 and det.preset is None
    # ... and a stock key set of that width (no proj_l) falls back to the preset's 12 heads.
    stock = layouts.to_canonical(_stock(_zero_views(layouts.expected_shapes(cfg, False))), "wan")
    det = layouts.infer_config(stock, "wan")
    assert det.config.num_heads == 12 and det.preset == "wan2.1-t2v-1.3b"


@pytest.mark.parametrize(
    ("preset", "qkvo", "ffn0", "ffn2"),
    [("wan2.1-t2v-1.3b", (12, 12), (70, 12), (12, 70)),
     ("wan2.1-t2v-14b", (40, 40), (108, 40), (40, 108)),
     ("wan2.2-i2v-a14b", (40, 40), (108, 40), (40, 108))],
)
def test_quant_scale_shapes_match_the_spec(preset, qkvo, ffn0, ffn2):
    shapes = layouts.expected_shapes(PRESETS[preset], True)
    for i in (0, PRESETS[preset].num_layers - 1):
        for a in ("self_attn", "cross_attn"):
            for p in "qkvo":
                assert shapes[f"blocks.{i}.{a}.{p}.scale"] == qkvo
                assert f"blocks.{i}.{a}.{p}.weight" not in shapes
        assert shapes[f"blocks.{i}.ffn.0.scale"] == ffn0
        assert shapes[f"blocks.{i}.ffn.2.scale"] == ffn2
        assert shapes[f"blocks.{i}.ffn.0.int8_weight"] == (PRESETS[preset].ffn_dim, PRESETS[preset].dim)
        assert shapes[f"blocks.{i}.{layouts.PROJ_L}.weight"] == (128, 128)  # proj_l is never quantised


def test_key_counts_match_the_spec():
    def count(preset, sla_proj, quantized):
        return len(layouts.expected_shapes(PRESETS[preset].replace(sla_proj=sla_proj), quantized))

    assert count("wan2.1-t2v-1.3b", False, False) == 825
    assert count("wan2.1-t2v-14b", False, False) == 1095
    assert count("wan2.1-t2v-1.3b", True, False) == 885
    assert count("wan2.1-t2v-1.3b", True, True) == 1185
    # The fixtures (2 layers): 69 stock, 73 TurboDiffusion, 93 -quant (fixtures README).
    assert len(load_safetensors(WAN_ST)) == count("tiny", False, False) == 69
    assert len(load_pth(TURBO_PTH)) == count("tiny", True, False) == 73
    assert len(load_pth(QUANT_PTH)) == count("tiny", True, True) == 93


# --- 2. renames and wrappers ---------------------------------------------------------------------------------------

def test_diffusers_key_set_maps_to_the_canonical_one():
    canonical = _stock(_zero_views(layouts.expected_shapes(PRESETS["wan2.1-t2v-14b"], False)))
    diffusers = {_diffusers_name(k): v for k, v in canonical.items()}
    assert len(diffusers) == len(canonical) == 1095
    assert "blocks.7.norm2.weight" in diffusers and "blocks.7.norm3.weight" not in diffusers
    diffusers["blocks.3.attn2.norm_added_q.weight"] = np.zeros(5120, np.float32)  # ignored, as diffusers does
    assert layouts.detect_layout(diffusers) == "diffusers"
    back = layouts.to_canonical(diffusers, "diffusers")
    assert sorted(back) == sorted(canonical)
    for k, v in canonical.items():
        if k != "patch_embedding.weight":
            assert back[k] is v, k  # renamed, not copied
    assert back["blocks.7.norm3.weight"] is diffusers["blocks.7.norm2.weight"]
    det = layouts.infer_config(back, "diffusers")
    assert det.preset == "wan2.1-t2v-14b" and det.config.family == "wan"


def test_spec_rename_table_matches_the_diffusers_fixture():
    """The hand-written table above reproduces diffusers' own key names (checked against the sharded fixture)."""
    wan = load_safetensors(WAN_ST)
    diffusers = load_safetensors_index(DIFFUSERS_INDEX)
    assert sorted(_diffusers_name(k) for k in wan) == sorted(diffusers)
    canonical = layouts.to_canonical(diffusers, "diffusers")
    assert sorted(canonical) == sorted(wan)
    for k in wan:
        np.testing.assert_array_equal(canonical[k].reshape(wan[k].shape), wan[k], err_msg=k)


def test_wrapper_prefixes_are_stripped():
    v = np.zeros(3)
    stripped = layouts.strip_prefixes({
        "net.blocks.0.ffn.0.weight": v,
        "_checkpoint_wrapped_module.head.modulation": v,
        "model.diffusion_model.patch_embedding.bias": v,
        "net.blocks.1._checkpoint_wrapped_module.self_attn.q.weight": v,
        "model.diffusion_model._checkpoint_wrapped_module.blocks.2.norm3.bias": v,
        "time_embedding.0.weight": v,
    })
    assert sorted(stripped) == sorted([
        "blocks.0.ffn.0.weight", "head.modulation", "patch_embedding.bias", "blocks.1.self_attn.q.weight",
        "blocks.2.norm3.bias", "time_embedding.0.weight",
    ])


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "net.", "_checkpoint_wrapped_module."])
def test_prefixed_safetensors_converts_like_the_original(tmp_path, prefix):
    src = _save_st(tmp_path / "src" / "m.safetensors", {prefix + k: v for k, v in load_safetensors(WAN_ST).items()})
    a = convert([str(src)], str(tmp_path / "a"), num_heads=2, progress=False)
    b = convert([str(WAN_ST)], str(tmp_path / "b"), progress=False)
    _assert_same_params(a, b)
    assert checkpoint.read_meta(a)["model"] == checkpoint.read_meta(b)["model"]


def test_state_dict_wrapped_net_pth_is_unwrapped(tmp_path):
    """modify_model.py's input: {"state_dict": {"net.…": …}} (+ bookkeeping) with a Conv3d-shaped patch embedding
    (wan-model.md 8.4), written as a torch zip by hand. proj_l marks it as TurboDiffusion's network."""
    inner = {"net." + k: v for k, v in load_pth(TURBO_PTH).items()}
    w = inner["net.patch_embedding.weight"]
    inner["net.patch_embedding.weight"] = w.reshape(w.shape[0], w.shape[1] // 4, 1, 2, 2)
    src = _save_pth(tmp_path / "src" / "merged.pth", {"state_dict": inner, "step": 1000})
    loaded = load_pth(src)
    assert loaded["step"] == 1000 and sorted(loaded["state_dict"]) == sorted(inner)
    a = convert([str(src)], str(tmp_path / "a"), progress=False)
    b = convert([str(TURBO_PTH)], str(tmp_path / "b"), progress=False)
    _assert_same_params(a, b)
    assert checkpoint.read_meta(a)["source"]["layout"] == "turbodiffusion"
    assert checkpoint.read_meta(a)["model"]["family"] == "turbodiffusion"
    assert checkpoint.read_meta(a)["source"]["sha256"] == {"merged.pth": _hash(src)}


# --- 3. refusals through the CLI -----------------------------------------------------------------------------------

def _wan_tensors() -> dict[str, np.ndarray]:
    return dict(load_safetensors(WAN_ST))


def test_missing_keys_are_listed_by_name(tmp_path, capsys):
    t = _wan_tensors()
    del t["blocks.1.ffn.2.bias"], t["blocks.0.cross_attn.norm_k.weight"]
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "m.safetensors", t)])
    assert "2 missing: blocks.0.cross_attn.norm_k.weight, blocks.1.ffn.2.bias" in line
    assert "unexpected" not in line and "shape" not in line


def test_missing_quant_scale_is_listed(tmp_path, capsys):
    t = dict(load_pth(QUANT_PTH))
    del t["blocks.1.self_attn.k.scale"]
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "q.safetensors", t)])
    assert "1 missing: blocks.1.self_attn.k.scale" in line


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_missing_patch_embedding_is_named(tmp_path, capsys, layout):
    t = _wan_tensors() if layout == "wan" else dict(load_safetensors_index(DIFFUSERS_INDEX))
    del t["patch_embedding.weight"]
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "m.safetensors", t)])
    assert "patch_embedding.weight" in line


def test_unexpected_keys_are_listed_by_name(tmp_path, capsys):
    t = _wan_tensors()
    t["blocks.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    t["pos_embedding"] = np.zeros(3, np.float32)
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "m.safetensors", t)])
    assert "2 unexpected: blocks.0.self_attn.extra.weight, pos_embedding" in line
    assert "missing" not in line


def test_shape_mismatch_is_named(tmp_path, capsys):
    t = _wan_tensors()
    t["blocks.1.ffn.0.weight"] = np.zeros((32, 20), np.float32)
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "m.safetensors", t)])
    assert "1 with the wrong shape: blocks.1.ffn.0.weight: (32, 20) (expected (32, 24))" in line


def test_unknown_layout_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    t = {f"encoder.layer.{i}.dense.weight": rng.standard_normal((4, 4)).astype(np.float32) for i in range(3)}
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "bert.safetensors", t)])
    assert "unknown checkpoint layout" in line and "encoder.layer.0.dense.weight" in line


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_conv3d_patch_embedding_with_another_kernel_is_refused(tmp_path, capsys, layout):
    # [24, 4, 1, 4, 4] has as many elements as [24, 16, 1, 2, 2]; it must not be read as in_dim 16.
    t = _wan_tensors() if layout == "wan" else dict(load_safetensors_index(DIFFUSERS_INDEX))
    t["patch_embedding.weight"] = np.zeros((24, 4, 1, 4, 4), np.float32)
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "m.safetensors", t)])
    assert "patch_embedding.weight has shape (24, 4, 1, 4, 4)" in line


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_pth_is_refused(tmp_path, capsys, keep):
    data = TURBO_PTH.read_bytes()
    src = tmp_path / "src" / "turbo_t2v.pth"
    src.parent.mkdir()
    src.write_bytes(data[: int(len(data) * keep)])
    line = _refused(capsys, tmp_path, [src])
    assert str(src) in line and "truncated" in line


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.mark.parametrize("variant", ["top_level", "inside_state_dict"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, variant):
    marker = tmp_path / "pwned"
    touch = f"touch {marker}"
    if variant == "top_level":
        data_pkl = b"\x80\x02" + _global("os", "system") + b"(" + _str(touch) + b"tR."
    else:
        data_pkl = pickle.dumps({"state_dict": {"net.patch_embedding.weight": _Evil(touch)}}, protocol=2)
    src = _write_torch_zip(tmp_path / "src" / "evil.pth", data_pkl, {})
    line = _refused(capsys, tmp_path, [src])
    assert "refusing to load global" in line and "system" in line
    assert not marker.exists()


def test_nonexistent_src_is_refused(tmp_path, capsys):
    line = _refused(capsys, tmp_path, [tmp_path / "nope.pth"])
    assert f"{tmp_path / 'nope.pth'}: no such file or directory" in line


def test_folder_with_several_checkpoints_is_refused(tmp_path, capsys):
    line = _refused(capsys, tmp_path, [FIXTURES / "wan_t2v"])
    assert "several checkpoint files" in line
    assert "diffusion_pytorch_model.safetensors" in line and "wan_t2v.pth" in line


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_clip_conditioned_i2v_is_refused(tmp_path, capsys, layout):
    """Wan2.1 I2V-14B's extra keys (wan-model.md 8.2), at the fixture's width."""
    d = 24
    if layout == "wan":
        t, names = _wan_tensors(), {"k": "cross_attn.k_img", "v": "cross_attn.v_img",
                                    "norm": "cross_attn.norm_k_img", "img": "img_emb.proj.1"}
    else:
        t, names = dict(load_safetensors_index(DIFFUSERS_INDEX)), {
            "k": "attn2.add_k_proj", "v": "attn2.add_v_proj", "norm": "attn2.norm_added_k",
            "img": "condition_embedder.image_embedder.ff.net.0.proj"}
    for i in range(2):
        for p in ("k", "v"):
            t[f"blocks.{i}.{names[p]}.weight"] = np.zeros((d, d), np.float32)
            t[f"blocks.{i}.{names[p]}.bias"] = np.zeros(d, np.float32)
        t[f"blocks.{i}.{names['norm']}.weight"] = np.ones(d, np.float32)
    t[f"{names['img']}.weight"] = np.zeros((16, 16), np.float32)
    line = _refused(capsys, tmp_path, [_save_st(tmp_path / "src" / "i2v.safetensors", t)])
    assert "CLIP-conditioned Wan2.1 I2V" in line and f"blocks.0.{names['k']}.bias" in line


def test_mixed_quantized_and_bf16_is_refused(tmp_path, capsys):
    t = dict(load_pth(QUANT_PTH))
    del t["blocks.1.ffn.2.int8_weight"], t["blocks.1.ffn.2.scale"]
    t["blocks.1.ffn.2.weight"] = load_pth(TURBO_PTH)["blocks.1.ffn.2.weight"]
    src = _save_pth(tmp_path / "src" / "mixed.pth", t)
    line = _refused(capsys, tmp_path, [src])
    assert "mixes quantised and bf16" in line and "blocks.1.ffn.2.weight" in line


def test_preset_mismatch_lists_the_differing_fields(tmp_path, capsys):
    line = _refused(capsys, tmp_path, [WAN_ST], "--preset", "wan2.1-t2v-1.3b")
    assert "does not match preset wan2.1-t2v-1.3b" in line
    for field in ("dim 24 (preset 1536)", "ffn_dim 32 (preset 8960)", "num_heads 2 (preset 12)",
                  "num_layers 2 (preset 30)", "text_dim 32 (preset 4096)"):
        assert field in line
    for same in ("in_dim", "out_dim", "freq_dim", "sla_proj", "family"):
        assert f"{same} " not in line
    line = _refused(capsys, tmp_path, [FIXTURES / "turbo_i2v" / "turbo_i2v.pth"], "--preset", "tiny")
    assert line.endswith("does not match preset tiny: in_dim 36 (preset 16)")


def test_matching_preset_is_accepted(tmp_path):
    out = convert([str(WAN_ST)], str(tmp_path / "ckpt"), preset="tiny", progress=False)
    assert checkpoint.read_meta(out)["preset"] == "tiny"


def test_existing_out_needs_overwrite_and_is_replaced_atomically(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    line = _refused(capsys, tmp_path, [WAN_ST], out=out)
    assert "already exists" in line and "--overwrite" in line
    assert (out / "old.txt").read_text() == "keep me"

    assert main([str(TURBO_PTH), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not (out / "old.txt").exists()
    assert checkpoint.read_meta(out)["source"]["layout"] == "turbodiffusion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .partial / .old sibling left


def test_failed_write_leaves_the_old_folder_and_no_temp(tmp_path, monkeypatch):
    out = convert([str(WAN_ST)], str(tmp_path / "ckpt"), progress=False)
    before = _blocks_and_embeddings(out)
    meta = checkpoint.read_meta(out)
    real_save, calls = checkpoint._save_tree, []

    def failing_save(path, tree):
        calls.append(path)
        if len(calls) == 2:  # the embeddings were written, block 0 fails
            raise OSError("No space left on device")
        real_save(path, tree)

    monkeypatch.setattr(checkpoint, "_save_tree", failing_save)
    with pytest.raises(OSError, match="No space left"):
        convert([str(TURBO_PTH)], str(out), overwrite=True, progress=False)
    assert ".partial" in str(calls[0])  # it really was writing beside --out
    assert checkpoint.read_meta(out) == meta
    after = _blocks_and_embeddings(out)
    for k, v in checkpoint._flatten(before).items():
        np.testing.assert_array_equal(checkpoint._flatten(after)[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    line = _refused(capsys, tmp_path, [WAN_ST], out=tmp_path / "afile" / "ckpt")
    assert "afile" in line


def test_overwrite_onto_a_plain_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    line = _refused(capsys, tmp_path, [WAN_ST], "--overwrite", out=tmp_path / "afile")
    assert "not a folder" in line
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_config_json_that_is_not_an_object_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(WAN_ST, src / WAN_ST.name)
    (src / "config.json").write_text("[1, 2]")
    assert "not an object" in _refused(capsys, tmp_path, [src / WAN_ST.name])


# --- 4. head count -------------------------------------------------------------------------------------------------

def test_num_heads_flag_overrides_config_json(tmp_path):
    # WAN_ST sits beside a config.json that says num_heads 2.
    out = convert([str(WAN_ST)], str(tmp_path / "ckpt"), num_heads=4, progress=False)
    meta = checkpoint.read_meta(out)
    assert meta["model"]["num_heads"] == 4 and meta["preset"] is None
    assert turbojax.load_dit(out, dtype=jnp.float32, progress=False).cfg.head_dim == 6


def test_num_heads_flag_that_contradicts_proj_l_is_refused(tmp_path, capsys):
    line = _refused(capsys, tmp_path, [TURBO_PTH], "--num-heads", "3")
    assert "blocks.0.self_attn.attn_op.local_attn.proj_l.weight: (12, 12) (expected (8, 8))" in line


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_config_json_head_count_is_used(tmp_path, layout):
    src = tmp_path / "src"
    if layout == "wan":
        src.mkdir()
        shutil.copy(WAN_ST, src)
        cfg = json.loads((FIXTURES / "wan_t2v" / "config.json").read_text())
        cfg["num_heads"] = 3
    else:
        shutil.copytree(DIFFUSERS_DIR, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_attention_heads"], cfg["attention_head_dim"] = 3, 8
    (src / "config.json").write_text(json.dumps(cfg))
    meta = checkpoint.read_meta(convert([str(src)], str(tmp_path / "ckpt"), progress=False))
    assert meta["model"]["num_heads"] == 3  # the width alone (tiny preset) would say 2
    # Without the config.json the width decides.
    (src / "config.json").unlink()
    meta = checkpoint.read_meta(convert([str(src)], str(tmp_path / "ckpt2"), progress=False))
    assert meta["model"]["num_heads"] == 2 and meta["preset"] == "tiny"


def _unknown_width_stock(tmp_path: Path) -> Path:
    cfg = WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=1, text_dim=16, sla_proj=False, family="wan")
    t = {k: np.zeros(s, np.float32) for k, s in layouts.expected_shapes(cfg, False).items()}
    return _save_st(tmp_path / "src" / "m.safetensors", _stock(t))


def test_unknown_width_without_head_count_asks_for_num_heads(tmp_path, capsys):
    src = _unknown_width_stock(tmp_path)
    line = _refused(capsys, tmp_path, [src])
    assert "dim-32" in line and "pass --num-heads" in line
    assert main([str(src), "--out", str(tmp_path / "ckpt"), "--quiet", "--num-heads", "2"]) == 0
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    assert (meta["model"]["dim"], meta["model"]["num_heads"], meta["preset"]) == (32, 2, None)


# --- 5. the written folder -----------------------------------------------------------------------------------------

def test_written_folder_for_sharded_diffusers(tmp_path):
    out = convert([str(DIFFUSERS_DIR)], str(tmp_path / "ckpt"), progress=False)
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "turbojax-dit/1" == checkpoint.FORMAT
    want = PRESETS["tiny"].replace(sla_proj=False, family="wan")
    assert meta["model"] == json.loads(json.dumps(dataclasses.asdict(want)))
    assert meta["preset"] == "tiny"
    assert meta["source"]["layout"] == "diffusers"
    shards = sorted(DIFFUSERS_DIR.glob("*-of-00002.safetensors"))
    assert len(shards) == 2
    assert meta["source"]["sha256"] == {p.name: _hash(p) for p in shards}  # the shards, not the index
    assert meta["source"]["dtypes"] == {"float32": 69}
    assert meta["quantization"] is None
    assert sorted(p.name for p in (out / "params").iterdir()) == ["blocks", "embeddings"]
    assert sorted(p.name for p in (out / "params" / "blocks").iterdir()) == ["000", "001"]

    dit = turbojax.load_dit(out, dtype=jnp.float32, progress=False)
    assert dit.cfg == want
    src = load_safetensors_index(DIFFUSERS_INDEX)
    np.testing.assert_array_equal(np.asarray(dit.blocks.ffn.fc2.bias[...])[1], src["blocks.1.ffn.net.2.bias"])
    np.testing.assert_array_equal(np.asarray(dit.blocks.norm3.weight[...])[0], src["blocks.0.norm2.weight"])


def test_written_folder_for_quantized_pth(tmp_path):
    out = convert([str(QUANT_PTH)], str(tmp_path / "ckpt"), progress=False)
    meta = checkpoint.read_meta(out)
    assert meta["quantization"] == {"scheme": "w8a8-int8", "block": [128, 128]}
    assert meta["source"] == {
        "layout": "turbodiffusion",
        "sha256": {QUANT_PTH.name: _hash(QUANT_PTH)},
        "dtypes": {"bfloat16": 15 + 2 * 13, "float32": 2 * (6 + 10), "int8": 2 * 10},
    }
    assert meta["model"]["sla_proj"] is True and meta["model"]["family"] == "turbodiffusion"
    block = checkpoint._restore_tree(out / "params" / "blocks" / "001")
    assert block["ffn"]["fc1"]["int8_weight"].dtype == np.int8 and "weight" not in block["ffn"]["fc1"]
    np.testing.assert_array_equal(block["ffn"]["fc1"]["int8_weight"], load_pth(QUANT_PTH)["blocks.1.ffn.0.int8_weight"])
    dit = turbojax.load_dit(out, progress=False)
    assert dit.cfg.num_heads == 2 and dit.linears == "w8a8"


# --- 6. streaming --------------------------------------------------------------------------------------------------

def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _write_bf16_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bf16 safetensors file by hand, filled from one repeated 8 MB block of random finite values."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bits = np.random.default_rng(0).integers(0, 2**16, 2**22, dtype=np.uint16)
    chunk = ((bits & 0x807F) | 0x3C00).tobytes()  # sign, mantissa random; exponent near 1: finite, non-zero
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return offset


def test_conversion_streams(tmp_path):
    """Converting a ~410 MB stock-Wan checkpoint grows anonymous memory by far less than the model.

    A converter that materialises the tensors grows by ~1.1x the model here; this one by ~0.2x (a couple of blocks,
    orbax's copies and the hashing buffer)."""
    cfg = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=12, sla_proj=False, family="wan")
    shapes = layouts.expected_shapes(cfg, False)
    shapes["patch_embedding.weight"] = (cfg.dim, cfg.in_dim, 1, 2, 2)
    src = tmp_path / "src" / "big.safetensors"
    size = _write_bf16_safetensors(src, shapes)
    assert size > 400 * 2**20
    convert([str(WAN_ST)], str(tmp_path / "warmup"), progress=False)  # first-use allocations of orbax/tensorstore

    base = _rss_anon()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = convert([str(src)], str(tmp_path / "ckpt"), num_heads=8, progress=False)
    finally:
        stop.set()
        sampler.join()
    growth = peak[0] - base
    block = size / cfg.num_layers  # the embeddings here are small next to a block
    # Bounded by a few blocks in flight, whatever the depth (measured: ~2.5 blocks on 2 cores, ~4 on 16, where
    # tensorstore writes more at once): at 14B (700 MB blocks) a few GB, not the 28 GB model.
    assert growth < 6 * block, f"anonymous memory grew by {growth / 2**20:.0f} MB; one block is {block / 2**20:.0f} MB"

    meta = checkpoint.read_meta(out)
    assert meta["model"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert meta["source"]["dtypes"] == {"bfloat16": len(shapes)}
    last = checkpoint._restore_tree(out / "params" / "blocks" / "011")
    np.testing.assert_array_equal(last["ffn"]["fc2"]["weight"], load_safetensors(src)["blocks.11.ffn.2.weight"])


@pytest.mark.parametrize("field", ['"num_heads": null', '"num_heads": "2"', '"eps": null', '"num_heads": 2.5'])
def test_config_json_with_bad_field_types_is_refused(tmp_path, capsys, field):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(WAN_ST, src / WAN_ST.name)
    (src / "config.json").write_text("{%s}" % field)
    assert "config.json beside the checkpoint" in _refused(capsys, tmp_path, [src / WAN_ST.name])


def test_deeply_nested_pickle_is_refused(tmp_path, capsys):
    obj = {"w": np.zeros(2, np.float32)}
    for _ in range(200):
        obj = {"x": obj, "n": 1}
    src = _save_pth(tmp_path / "src" / "deep.pth", obj)
    assert "nested" in _refused(capsys, tmp_path, [src])


def test_index_with_shard_outside_its_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(DIFFUSERS_DIR, src)
    index = json.loads((src / DIFFUSERS_INDEX.name).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (src / DIFFUSERS_INDEX.name).write_text(json.dumps(index))
    assert "outside the index's folder" in _refused(capsys, tmp_path, [src])
