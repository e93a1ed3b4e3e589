"""umT5 text encoder: parity with transformers' UMT5EncoderModel from both checkpoint layouts converted by
turbojax-convert, tokenizer parity with transformers' T5Tokenizer, the encode() pipeline, memory release, int8 weights,
conversion refusals and the benchmark's CPU smoke run.

Oracles: tests/fixtures/make_umt5_fixtures.py (transformers 5.24.0, torch 2.13, fp32, eager attention; see its
docstring). Relative error everywhere = max|a - b| / max|b|.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import sentencepiece
from flax import nnx

import turbojax
from convert import umt5_layouts
from convert.cli import main as convert_main
from convert.errors import CheckpointError
from convert.pth import load_pth
from turbojax import text
from turbojax.checkpoint import CheckpointFormatError, read_meta
from turbojax.models.umt5 import (UMT5_PRESETS, UMT5Encoder, position_bucket, quantize_int8, relative_buckets,
                                  umt5_param_count)

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "umt5"
WAN_PTH = FIXTURES / "wan" / "models_t5_umt5-xxl-enc-bf16.pth"
HF_DIR = FIXTURES / "hf" / "text_encoder"
SPM = FIXTURES / "wan" / "google" / "umt5-xxl" / "spiece.model"
CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())
BY_NAME = {c["name"]: c for c in CASES}
PIPELINE_PROMPTS = ("simple", "unicode")  # as make_umt5_fixtures.PIPELINE_PROMPTS


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _convert(src: Path, out: Path) -> Path:
    assert convert_main([str(src), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("umt5")
    return {"wan": _convert(WAN_PTH, root / "wan"), "hf": _convert(HF_DIR, root / "hf")}


@pytest.fixture(scope="module")
def fp32_encoders(converted):
    return {name: turbojax.load_text_encoder(path, dtype=jnp.float32, progress=False, tokenizer=SPM)
            for name, path in converted.items()}


@pytest.fixture(scope="module")
def tokenizer():
    return text.UMT5Tokenizer(SPM)


# --- encoder parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["wan", "hf"])
@pytest.mark.parametrize("length", ["short", "long"])
def test_fp32_hidden_states_match_transformers(fp32_encoders, layout, length):
    """Both layouts, through turbojax-convert; 'long' (160 tokens) reaches the clamped last bucket of each side."""
    io = np.load(FIXTURES / layout / "io.npz")
    out = fp32_encoders[layout](io[f"ids_{length}"], io[f"mask_{length}"])
    assert out.shape == io[f"hidden_{length}"].shape and out.dtype == jnp.float32
    assert rel_err(out, io[f"hidden_{length}"]) <= 1e-5


def test_relative_buckets_match_transformers_bit_for_bit():
    ref = np.load(FIXTURES / "buckets.npz")
    np.testing.assert_array_equal(position_bucket(ref["rel"], 32, 128), ref["bucket"])
    table = relative_buckets(300, 32, 128)
    # [q, k]: keys after the query use buckets 16-31; |k - q| = 16 is the first position of log bucket 8 + 2
    assert table.dtype == np.int32 and (table[0, 16], table[16, 0], table[0, 299], table[299, 0]) == (26, 10, 31, 15)


def test_conversion_metadata(converted):
    wan, hf = read_meta(converted["wan"], text.FORMAT), read_meta(converted["hf"], text.FORMAT)
    for meta, layout in ((wan, "wan"), (hf, "transformers")):
        assert meta["component"] == "umt5" and meta["preset"] == "tiny" and meta["source"]["layout"] == layout
        assert meta["model"] == dataclasses.asdict(UMT5_PRESETS["tiny"])
    assert wan["source"]["dtypes"] == {"bfloat16": 22} and hf["source"]["dtypes"] == {"float32": 22}
    assert wan["tokenizer"]["file"] == text.TOKENIZER_FILE and hf["tokenizer"] is None
    assert (converted["wan"] / text.TOKENIZER_FILE).read_bytes() == SPM.read_bytes()
    assert sorted(p.name for p in (converted["wan"] / "params" / "blocks").iterdir()) == ["000", "001"]


def test_bf16_encoder_stays_near_the_oracle(converted):
    io = np.load(FIXTURES / "wan" / "io.npz")
    enc = turbojax.load_text_encoder(converted["wan"], progress=False)
    out = enc(io["ids_long"], io["mask_long"])
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, io["hidden_long"]) < 2e-2


def test_reloaded_encoder_reuses_the_compiled_program(converted):
    """A pipeline that frees the encoder after each prompt loads it again for the next: same structure, so the
    jitted encode is not traced or compiled again, and the result is the same."""
    first = turbojax.load_text_encoder(converted["wan"], dtype=jnp.float32, progress=False, tokenizer=SPM)
    want = np.asarray(first.encode(["a red fox"]))
    first.unload()
    compiled = text._encode._cache_size()
    again = turbojax.load_text_encoder(converted["wan"], dtype=jnp.float32, progress=False, tokenizer=SPM)
    np.testing.assert_array_equal(np.asarray(again.encode(["a red fox"])), want)
    assert text._encode._cache_size() == compiled


def test_int8_weights_stay_near_the_oracle(converted):
    io = np.load(FIXTURES / "wan" / "io.npz")
    enc = turbojax.load_text_encoder(converted["wan"], dtype=jnp.float32, quantize="int8", progress=False)
    q = enc._weights()["blocks"]["ffn"]["fc1"]
    assert q["int8_weight"].dtype == jnp.int8 and q["int8_weight"].shape == (2, 48, 32)
    assert q["scale"].shape == (2, 48) and "weight" not in q
    assert enc._weights()["token_embedding"]["weight"].dtype == jnp.float32
    err = rel_err(enc(io["ids_long"], io["mask_long"]), io["hidden_long"])
    assert 1e-4 < err < 3e-2  # really quantised, and still close


def test_quantize_int8_error_is_half_a_step():
    w = np.random.default_rng(0).standard_normal((7, 33)).astype(np.float32)
    w[3] = 0.0
    q, s = quantize_int8(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s[3] == 1.0 and not q[3].any()
    assert np.abs(q).max(axis=1)[[0, 1, 2, 4, 5, 6]].min() == 127
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 * (1 + 1e-6))


def test_real_size_key_set_detects_umt5_xxl():
    """The spec's 242-key Wan file and 5,680,910,336 parameters, as zero-byte views."""
    cfg = UMT5_PRESETS["umt5-xxl"]
    shapes = umt5_layouts.expected_shapes(cfg)
    assert len(shapes) == 242 and umt5_param_count(cfg) == 5_680_910_336
    views = {k: np.broadcast_to(np.zeros((), ml_dtypes.bfloat16), s) for k, s in shapes.items()}
    assert umt5_layouts.detect_layout(views) == "wan"
    assert umt5_layouts.infer_config(views, "wan", {"num_heads": 12}) == cfg  # a DiT config.json beside it: ignored
    umt5_layouts.validate(views, cfg)


# --- tokenizer -----------------------------------------------------------------------------------------------------

def _padded(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out, mask = np.zeros(512, np.int32), np.zeros(512, np.int32)
    out[: len(ids)], mask[: len(ids)] = ids, 1
    return out, mask


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tokenizer_matches_transformers(tokenizer, case):
    ids, mask = tokenizer.tokenize_cleaned([case["cleaned"]])
    want_ids, want_mask = _padded(case["ids"])
    np.testing.assert_array_equal(ids[0], want_ids)
    np.testing.assert_array_equal(mask[0], want_mask)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cleaning_and_tokenizing_match_wan(tokenizer, case):
    # ftfy is in the `test` extra, so it is there wherever the suite runs from `make test`.
    assert text.ftfy is not None or not case["needs_ftfy"], "install the test extra: pip install -e '.[test]'"
    assert text.clean_prompt(case["prompt"]) == case["cleaned"]
    np.testing.assert_array_equal(tokenizer([case["prompt"]])[0][0], _padded(case["ids"])[0])


def test_truncation_keeps_511_pieces_and_eos():
    long, fit = BY_NAME["long_truncated"]["ids"], BY_NAME["exact_fit"]["ids"]
    assert len(long) == len(fit) == 512 and long[-1] == fit[-1] == 1 and long[-2] != 1


def test_cleaning_without_ftfy(monkeypatch):
    monkeypatch.setattr(text, "ftfy", None)
    assert text.clean_prompt(" a\u3000\u2009b\n&amp;amp; c ") == "a b & c"
    assert text.clean_prompt("a\x1cb") == "a\x1cb"  # not Unicode White_Space, so Wan's \s keeps it
    assert text.clean_prompt("The cafÃ©") == "The cafÃ©"  # mojibake stays: that is ftfy's job
    with pytest.warns(UserWarning, match="ftfy is not installed"):
        text.UMT5Tokenizer(SPM)


def test_empty_prompt_is_the_lone_eos(fp32_encoders, tokenizer):
    """Documented behaviour, as the reference: '' (or a prompt that cleans to nothing) is [</s>], one real row."""
    ids, mask = tokenizer(["", " \t&nbsp;\n "])
    np.testing.assert_array_equal(ids, np.zeros((2, 512), np.int32) + (np.arange(512) == 0))
    np.testing.assert_array_equal(mask, ids)
    out = np.asarray(fp32_encoders["wan"].encode([""]))
    assert np.abs(out[0, 0]).min() > 0 and not out[0, 1:].any()


def test_special_token_text_is_refused(tokenizer):
    for prompt in ("a cat </s> runs", "x <extra_id_0> y", "<pad>", "an <unk>"):
        with pytest.raises(ValueError, match="special-token text"):
            tokenizer([prompt])


@pytest.mark.parametrize("prompts, error, match", [
    ("a cat", TypeError, "list of prompts"),
    ([], ValueError, "at least one prompt"),
    (["ok", 3], TypeError, "prompt 1 is a int"),
])
def test_bad_prompt_lists_are_refused(tokenizer, prompts, error, match):
    with pytest.raises(error, match=match):
        tokenizer(prompts)


def test_non_t5_sentencepiece_model_is_refused(tmp_path):
    lines = [f"word{i} other{i % 7} thing{i % 5}" for i in range(300)]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"),
                                             vocab_size=30, minloglevel=2)  # defaults: unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match="pad id -1 and eos id 2"):
        text.UMT5Tokenizer(tmp_path / "m.model")


# --- the encode() pipeline -----------------------------------------------------------------------------------------

def test_encode_matches_the_reference_pipeline(fp32_encoders):
    """Cleaning, tokenisation, the encoder and the zeroing of rows past each prompt, against transformers."""
    ref = np.load(FIXTURES / "wan" / "io.npz")["encode"]
    out = np.asarray(fp32_encoders["wan"].encode([BY_NAME[n]["prompt"] for n in PIPELINE_PROMPTS]))
    assert out.shape == (2, 512, 32)
    assert rel_err(out, ref) <= 1e-5
    for b, name in enumerate(PIPELINE_PROMPTS):
        assert not out[b, len(BY_NAME[name]["ids"]):].any()


def test_new_prompts_do_not_recompile(fp32_encoders):
    enc = fp32_encoders["wan"]
    a = enc.encode(["a red cat", "blue sky", "rain"])
    compiled = text._encode._cache_size()
    b = enc.encode(["a dog runs quickly over the ocean", "", "neon light"])
    assert text._encode._cache_size() == compiled
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_unload_frees_the_weights(converted):
    enc = turbojax.load_text_encoder(converted["wan"], progress=False)
    arrays = jax.tree.leaves(enc._weights())
    with enc:
        enc.encode(["a cat"])
    assert not enc.loaded and all(a.is_deleted() for a in arrays)
    with pytest.raises(RuntimeError, match="unloaded"):
        enc.encode(["a cat"])
    enc.unload()  # a second unload is a no-op


def test_checkpoint_without_tokenizer_asks_for_one(converted):
    enc = turbojax.load_text_encoder(converted["hf"], progress=False)
    assert enc.tokenizer is None
    with pytest.raises(RuntimeError, match="tokenizer="):
        enc.encode(["a cat"])


def test_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer):
    cfg = dataclasses.replace(UMT5_PRESETS["tiny"], vocab_size=512)
    with pytest.raises(ValueError, match="1000 pieces"):
        text.TextEncoder(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))), tokenizer)


@pytest.mark.parametrize("ids, mask, error, match", [
    (np.full((1, 5), 1024), np.ones((1, 5)), ValueError, r"\[0, 1024\)"),
    (np.ones((1, 5), np.int32), np.ones((1, 4)), ValueError, r"\[B, L\]"),
    (np.ones(5, np.int32), np.ones(5), ValueError, r"\[B, L\]"),
    (np.ones((1, 5), np.float32), np.ones((1, 5)), TypeError, "integer"),
])
def test_bad_ids_are_refused(fp32_encoders, ids, mask, error, match):
    with pytest.raises(error, match=match):
        fp32_encoders["hf"](ids, mask)


# --- conversion refusals -------------------------------------------------------------------------------------------

def _wan_tensors() -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in load_pth(WAN_PTH).items()}


def _refused(capsys, tmp_path: Path, tensors: dict[str, np.ndarray], *extra: str) -> str:
    src = tmp_path / "src" / "t5.safetensors"
    src.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, src)
    capsys.readouterr()
    assert convert_main([str(src), "--out", str(tmp_path / "ckpt"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("turbojax-convert: error: ") and not (tmp_path / "ckpt").exists()
    return err[0]


def test_missing_and_unexpected_keys_are_listed(tmp_path, capsys):
    t = _wan_tensors()
    del t["blocks.1.ffn.fc2.weight"]
    t["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    line = _refused(capsys, tmp_path, t)
    assert "2-layer dim-32 umT5 encoder" in line
    assert "1 missing: blocks.1.ffn.fc2.weight" in line and "1 unexpected: blocks.0.attn.extra.weight" in line


def test_wrong_shape_is_named(tmp_path, capsys):
    t = _wan_tensors()
    t["blocks.1.attn.o.weight"] = np.zeros((32, 40), np.float32)
    assert "blocks.1.attn.o.weight: (32, 40) (expected (32, 48))" in _refused(capsys, tmp_path, t)


def test_non_float_weights_are_refused(tmp_path, capsys):
    t = _wan_tensors()
    t["blocks.0.attn.q.weight"] = np.zeros((48, 32), np.int8)
    assert "blocks.0.attn.q.weight: int8" in _refused(capsys, tmp_path, t)


def test_t5_with_one_shared_bias_table_is_refused(tmp_path, capsys):
    t = _wan_tensors()
    del t["blocks.1.pos_embedding.embedding.weight"]
    assert "T5 encoder (one shared table), not umT5" in _refused(capsys, tmp_path, t)


def test_dit_flags_are_refused_for_a_text_encoder(tmp_path, capsys):
    assert "this checkpoint is a umT5 text encoder" in _refused(capsys, tmp_path, _wan_tensors(), "--num-heads", "4")


def test_transformers_keys_convert_like_the_wan_file(tmp_path):
    """transformers names, the tied encoder.embed_tokens copy and a full model's decoder keys are handled."""
    hf = {_wan_to_hf(k): v for k, v in _wan_tensors().items()}
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"]
    hf["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((48, 32), np.float32)
    hf["lm_head.weight"] = np.zeros((1024, 32), np.float32)
    canon = umt5_layouts.to_canonical(hf, umt5_layouts.detect_layout(hf))
    want = _wan_tensors()
    assert sorted(canon) == sorted(want)
    assert all(np.array_equal(canon[k], want[k]) for k in want)


def _wan_to_hf(key: str) -> str:
    """wan-model.md 6.4, written out independently of convert/umt5_layouts.py."""
    table = {"norm1": "layer.0.layer_norm", "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
             "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
             "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
             "norm2": "layer.1.layer_norm", "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
             "ffn.fc1": "layer.1.DenseReluDense.wi_1", "ffn.fc2": "layer.1.DenseReluDense.wo"}
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    _, i, rest = key.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"encoder.block.{i}.{table[module]}.{param}"


def test_loaders_refuse_each_others_folders(converted, tmp_path):
    with pytest.raises(CheckpointFormatError, match="turbojax-umt5/1"):
        turbojax.load_dit(converted["wan"], progress=False)
    dit = tmp_path / "dit"
    assert convert_main([str(ROOT / "tests/fixtures/dit/turbo_t2v/turbo_t2v.pth"), "--out", str(dit), "--quiet"]) == 0
    with pytest.raises(CheckpointFormatError, match="this loader reads 'turbojax-umt5/1'"):
        turbojax.load_text_encoder(dit, progress=False)
    with pytest.raises(ValueError, match="quantize"):
        turbojax.load_text_encoder(converted["wan"], quantize="int4")


def test_umt5_is_not_taken_for_another_component():
    assert umt5_layouts.detect_layout({"patch_embedding.weight": np.zeros((2, 2))}) is None
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        umt5_layouts.infer_config(_wan_tensors(), "transformers", {"feed_forward_proj": "relu"})


# --- benchmark and README ------------------------------------------------------------------------------------------

def test_benchmark_runs_on_cpu_at_tiny_size(capsys):
    from turbojax.bench.text_encode import main

    assert main(["--tiny", "--iters", "1", "--weights", "int8"]) == 0  # the bf16 path is the same code, less a branch
    assert re.search(r"\| tiny \| int8 \| 1 \| [\d.]+ \| [\d.]+ \|", capsys.readouterr().out)


def test_readme_text_encoder_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"turbojax-convert (tests/fixtures/umt5/\S+) --out (\S+)", readme)
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_text_encoder" in b)
    monkeypatch.chdir(tmp_path)
    assert convert_main([str(ROOT / command.group(1)), "--out", command.group(2), "--quiet"]) == 0
    exec(compile(block, "README.md", "exec"), {})
    assert "(1, 512, 32) bfloat16" in capsys.readouterr().out
