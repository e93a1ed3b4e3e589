"""umT5 text-encoder checkpoints and their mapping onto turbojax's UMT5Encoder tree (wan-model.md 6.4).

Layouts:
  "wan"           Wan's models_t5_umt5-xxl-enc-bf16.pth: token_embedding, blocks.N.{norm1, attn.{q,k,v,o}, norm2,
                  ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}, norm
  "transformers"  UMT5EncoderModel safetensors (a diffusers Wan repo's text_encoder/, possibly sharded): shared,
                  encoder.block.N.layer.{0,1}.*, encoder.final_layer_norm; the decoder and lm_head of a full
                  encoder-decoder checkpoint are ignored
transformers names are renamed to Wan's ("canonical"), then mapped onto turbojax paths; arrays stay zero-copy views.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from convert.common import key_problems, module_tree, rename
from convert.errors import CheckpointError
from turbojax.models.umt5 import UMT5_PRESETS, UMT5Config

LAYOUTS = ("wan", "transformers")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# transformers name -> canonical (Wan) name
HF_RENAMES = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.embed_tokens\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]
HF_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")

# canonical module -> turbojax path
NON_BLOCK = {"token_embedding": ("token_embedding",), "norm": ("norm",)}
BLOCK = {
    "norm1": ("norm1",),
    **{f"attn.{p}": ("attn", p) for p in "qkvo"},
    "pos_embedding.embedding": ("pos_embedding",),
    "norm2": ("norm2",),
    "ffn.gate.0": ("ffn", "gate"),
    "ffn.fc1": ("ffn", "fc1"),
    "ffn.fc2": ("ffn", "fc2"),
}

# Where a tokenizer sits relative to the checkpoint's folder: Wan folders keep google/umt5-xxl/ beside the .pth,
# diffusers repos a tokenizer/ beside text_encoder/.
TOKENIZER_CANDIDATES = ("google/umt5-xxl/spiece.model", "spiece.model", "tokenizer/spiece.model",
                        "../tokenizer/spiece.model")


def detect_layout(tensors: dict[str, np.ndarray]) -> str | None:
    """"wan" or "transformers" for a umT5 encoder checkpoint, None for anything else (the DiT converter's turn)."""
    if any(k.startswith("encoder.block.") for k in tensors):
        return "transformers"
    if "token_embedding.weight" in tensors and any(re.match(r"blocks\.\d+\.attn\.q\.weight$", k) for k in tensors):
        return "wan"
    return None


def to_canonical(tensors: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """Renames a layout's keys to Wan's. transformers' tied shared / encoder.embed_tokens become one tensor."""
    if layout == "wan":
        return dict(tensors)
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if HF_IGNORED.match(key):
            continue
        key = rename(key, HF_RENAMES)
        if key == "token_embedding.weight" and key in out:
            if out[key].shape != value.shape:
                raise CheckpointError(f"shared.weight {out[key].shape} and encoder.embed_tokens.weight {value.shape} "
                                      "differ in shape; they are the same tied table in UMT5EncoderModel")
            continue
        out[key] = value
    return out


def _shape(tensors, key) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"missing key {key} (needed to infer the encoder's size)")
    return tuple(tensors[key].shape)


def infer_config(tensors: dict[str, np.ndarray], layout: str, config_json: dict | None = None) -> UMT5Config:
    """Sizes from the tensor shapes (canonical keys); max distance and eps from the config.json of a transformers
    layout (a config.json beside Wan's .pth is the DiT's and is ignored: Wan hard-codes 128 and 1e-6)."""
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError("the umT5 checkpoint has no blocks (no blocks.N.* / encoder.block.N.* keys)")
    tables = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" in tensors]
    if tables == [0] and len(layers) > 1:
        raise CheckpointError("only block 0 has a relative-position bias table: this is a T5 encoder (one shared "
                              "table), not umT5, which has one per layer")
    cj = (config_json or {}) if layout == "transformers" else {}
    if cj.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"config.json says feed_forward_proj={cj['feed_forward_proj']!r}; umT5 uses "
                              "'gated-gelu'")
    vocab, dim = _shape(tensors, "token_embedding.weight")
    inner = _shape(tensors, "blocks.0.attn.q.weight")[0]
    buckets, heads = _shape(tensors, "blocks.0.pos_embedding.embedding.weight")
    if "num_heads" in cj and int(cj["num_heads"]) != heads:
        raise CheckpointError(f"config.json says num_heads={cj['num_heads']} but the bias tables have {heads} columns")
    if inner % heads:
        raise CheckpointError(f"attention width {inner} is not a multiple of the {heads} heads of the bias table")
    return UMT5Config(
        vocab_size=vocab,
        dim=dim,
        num_heads=heads,
        head_dim=inner // heads,
        ffn_dim=_shape(tensors, "blocks.0.ffn.fc1.weight")[0],
        num_layers=layers[-1] + 1,
        num_buckets=buckets,
        max_distance=int(cj.get("relative_attention_max_distance", 128)),
        eps=float(cj.get("layer_norm_epsilon", 1e-6)),
    )


def preset_of(cfg: UMT5Config) -> str | None:
    return next((name for name, p in UMT5_PRESETS.items() if p == cfg), None)


def expected_shapes(cfg: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every canonical key of a checkpoint of this config, with its shape."""
    d, inner, f = cfg.dim, cfg.inner_dim, cfg.ffn_dim
    shapes = {"token_embedding.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm2.weight": (d,),
            b + "attn.q.weight": (inner, d), b + "attn.k.weight": (inner, d), b + "attn.v.weight": (inner, d),
            b + "attn.o.weight": (d, inner),
            b + "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
            b + "ffn.gate.0.weight": (f, d), b + "ffn.fc1.weight": (f, d), b + "ffn.fc2.weight": (d, f),
        })
    return shapes


def validate(tensors: dict[str, np.ndarray], cfg: UMT5Config) -> None:
    """Raises one CheckpointError listing every missing key, unexpected key, shape mismatch and non-float dtype."""
    want = expected_shapes(cfg)
    dtypes = [f"{k}: {tensors[k].dtype}" for k in sorted(set(want) & set(tensors))
              if np.dtype(tensors[k].dtype).name not in FLOAT_DTYPES]
    problems = key_problems(
        tensors, want, (f"not {'/'.join(FLOAT_DTYPES)} (scaled fp8 or quantised files are not supported)", dtypes))
    if problems:
        raise CheckpointError(
            f"the checkpoint does not match a {cfg.num_layers}-layer dim-{cfg.dim} umT5 encoder: " + "; ".join(problems)
        )


def embeddings_tree(tensors: dict[str, np.ndarray]) -> dict:
    """The token embedding and the final norm as a turbojax tree."""
    return module_tree({k: v for k, v in tensors.items() if not k.startswith("blocks.")}, NON_BLOCK)


def block_tree(tensors: dict[str, np.ndarray], i: int) -> dict:
    """Block i's parameters as a turbojax tree."""
    prefix = f"blocks.{i}."
    return module_tree({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, BLOCK)


def find_tokenizer(checkpoint_file: Path) -> Path | None:
    """The umT5 SentencePiece model shipped beside a checkpoint (TOKENIZER_CANDIDATES), or None."""
    for rel in TOKENIZER_CANDIDATES:
        p = checkpoint_file.parent / rel
        if p.is_file():
            return p.resolve()
    return None
