"""Prompts -> umT5 embeddings for the DiT: Wan's prompt cleaning, the umT5 SentencePiece tokenizer, the jitted encoder.

    enc = turbojax.load_text_encoder("ckpt/umt5")   # a folder written by turbojax-convert
    context = enc.encode(["A cat walks ..."])       # [B, 512, 4096] bf16; rows past each prompt are zero
    enc.unload()                                    # frees its device memory before the DiT runs

Cleaning (wan-model.md 6.3): ftfy.fix_text when ftfy is installed (an optional dependency, as in diffusers; Wan always
applies it, and it straightens curly quotes, full-width letters, ligatures and mojibake), html.unescape twice, strip,
whitespace runs to one space, strip. Tokenisation: SentencePiece pieces, </s> (id 1) appended, truncated to 511 pieces
+ </s>, padded with id 0 to 512. An empty prompt (also one that cleans to nothing) is the lone </s>, one real row, as
with the reference tokenizers. Prompts that contain the literal text of a special token (</s>, <pad>, <unk>,
<extra_id_N>) are refused: transformers' tokenizers turn those into control ids, and differently across versions.
"""

from __future__ import annotations

import functools
import html
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
from flax import nnx

from turbojax.checkpoint import read_meta, restore_module
from turbojax.models.umt5 import UMT5Config, UMT5Encoder, quantize_int8

try:
    import ftfy
except ImportError:
    ftfy = None

FORMAT = "turbojax-umt5/1"
TOKENIZER_FILE = "tokenizer/spiece.model"
TEXT_LEN = 512
PAD_ID, EOS_ID = 0, 1
SPECIAL_TEXT = re.compile(r"</s>|<pad>|<unk>|<extra_id_\d+>")
# Unicode White_Space, which is what Wan's `regex` \s matches (Python's re \s also takes \x1c-\x1f).
WHITESPACE = re.compile(r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text (if installed), html.unescape twice, strip, collapse whitespace, strip."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """tokenizer(prompts) -> (ids [B, text_len] int32, mask [B, text_len] int32), cleaning included."""

    def __init__(self, model_file: str | Path, text_len: int = TEXT_LEN):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {model_file}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(f"{model_file} has pad id {self.sp.pad_id()} and eos id {self.sp.eos_id()}; a T5 "
                             f"tokenizer has {PAD_ID} and {EOS_ID} (is this google/umt5-xxl's spiece.model?)")
        self.text_len = text_len
        if ftfy is None:
            warnings.warn("ftfy is not installed: prompts are cleaned without ftfy.fix_text (as diffusers does "
                          "without it); `pip install ftfy` to clean them exactly as Wan does", stacklevel=2)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenize_cleaned([clean_prompt(p) for p in _check_prompts(prompts)])

    def tokenize_cleaned(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Already-cleaned texts -> (ids, mask), each [B, text_len] int32."""
        ids = np.full((len(texts), self.text_len), PAD_ID, np.int32)
        mask = np.zeros((len(texts), self.text_len), np.int32)
        for b, text in enumerate(texts):
            special = SPECIAL_TEXT.search(text)
            if special:
                raise ValueError(f"prompt {b} contains the special-token text {special.group()!r}; umT5 tokenizers "
                                 "map it to a control id rather than text. Remove or rephrase it")
            pieces = self.sp.encode(text)[: self.text_len - 1] + [EOS_ID]
            ids[b, : len(pieces)] = pieces
            mask[b, : len(pieces)] = 1
        return ids, mask


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"pass a list of prompts (strings), got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("pass at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompt {bad[0]} is a {type(prompts[bad[0]]).__name__}, not a string")
    return list(prompts)


# Module-level jits with the graph structure static: an encoder loaded again (a pipeline that frees it after each
# prompt) reuses the compiled program instead of tracing and compiling umT5 anew.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, ids, mask):
    out = nnx.merge(graphdef, state)(ids, mask)
    return jnp.where(mask[..., None].astype(bool), out, jnp.zeros((), out.dtype))


class TextEncoder:
    """A umT5 encoder with its tokenizer. `encode(prompts)` -> [B, 512, dim] context for the DiT (rows past each
    prompt zeroed); `encoder(ids, mask)` -> raw hidden states [B, L, dim]. Both are jitted: a new prompt does not
    recompile, a new batch size (or L) compiles once. `unload()` (or leaving a `with` block) frees the weights."""

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer | None = None):
        self.cfg: UMT5Config = model.cfg
        self.dtype = model.dtype
        if tokenizer is not None and tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than the encoder's "
                             f"{self.cfg.vocab_size} embeddings: they do not belong together")
        self.tokenizer = tokenizer
        self._graphdef, self._state = nnx.split(model)

    @property
    def loaded(self) -> bool:
        return self._state is not None

    @property
    def nbytes(self) -> int:
        """Device bytes of the weights (0 once unloaded): what a pipeline's memory plan counts."""
        if self._state is None:
            return 0
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self._state))

    def _weights(self):
        if self._state is None:
            raise RuntimeError("this text encoder was unloaded; load it again with turbojax.load_text_encoder")
        return self._state

    def __call__(self, ids, mask) -> jax.Array:
        """ids [B, L] int token ids, mask [B, L] (1 = real token) -> hidden states [B, L, dim] in the encoder's
        dtype, every row computed (no zeroing)."""
        _check_ids(ids, mask, self.cfg.vocab_size)
        return _forward(self._graphdef, self._weights(), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))

    def encode(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> [B, 512, dim] in the encoder's dtype, rows at and past each prompt's length zero."""
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer (none was found beside the converted checkpoint); "
                               "pass tokenizer='.../google/umt5-xxl/spiece.model' to turbojax.load_text_encoder")
        ids, mask = self.tokenizer(prompts)
        return _encode(self._graphdef, self._weights(), jnp.asarray(ids), jnp.asarray(mask))

    def unload(self) -> None:
        """Frees the encoder's device memory now (not at garbage collection); later calls raise."""
        if self._state is not None:
            for leaf in jax.tree.leaves(self._state):
                leaf.delete()
            self._state = None

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.unload()


def _check_ids(ids, mask, vocab_size: int) -> None:
    shape_ids, shape_mask = np.shape(ids), np.shape(mask)
    if len(shape_ids) != 2 or shape_ids != shape_mask:
        raise ValueError(f"ids and mask must both be [B, L]; got ids {shape_ids}, mask {shape_mask}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be integer token ids, got {jnp.result_type(ids)}")
    if not isinstance(ids, jax.core.Tracer) and np.size(ids):
        lo, hi = int(np.min(ids)), int(np.max(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got ids from {lo} to {hi}")


def _quantize_linears(tree: dict) -> dict:
    """A restored block tree with its attention and FFN Linears as int8 + per-output-channel scale (host side)."""
    tree = dict(tree)
    for group in ("attn", "ffn"):
        if group in tree:
            tree[group] = {name: dict(zip(("int8_weight", "scale"), quantize_int8(np.asarray(lin["weight"]))))
                           for name, lin in tree[group].items()}
    return tree


def load_text_encoder(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    quantize: str | None = None,
    tokenizer: str | Path | None = None,
    progress: bool = True,
) -> TextEncoder:
    """Loads a converted umT5 folder (turbojax-convert of Wan's models_t5_umt5-xxl-enc-bf16.pth or a transformers
    UMT5EncoderModel) onto the default device.

    dtype: weights, activations and output (bf16 for real use, fp32 for parity checks). quantize="int8" keeps the
    block Linears as int8 with per-output-channel scales (weight-only: 6.7 GB instead of 11.4 GB at full size).
    tokenizer: a spiece.model to use instead of the folder's tokenizer/spiece.model."""
    path = Path(path)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    meta = read_meta(path, FORMAT)
    cfg = UMT5Config(**meta["model"])
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, dtype=dtype, quantized=quantize == "int8", rngs=nnx.Rngs(0)))
    model = restore_module(path, abstract, cfg.num_layers, progress=progress,
                           transform=_quantize_linears if quantize == "int8" else None)
    tok_path = Path(tokenizer) if tokenizer is not None else path / TOKENIZER_FILE
    tok = UMT5Tokenizer(tok_path) if tokenizer is not None or tok_path.is_file() else None
    return TextEncoder(model, tok)
