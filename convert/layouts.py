"""The three upstream Wan DiT checkpoint layouts and their mapping onto turbojax's parameter tree.

Layouts (wan-model.md 8):
  "turbodiffusion"  TurboDiffusion .pth: original key names, Linear patch embedding [D, 4 C_in], proj_l keys,
                    fp32 norm weights, optionally W8A8 (`int8_weight` + `scale` for the 10 block Linears)
  "wan"             stock Wan .pth/.safetensors: original key names, Conv3d patch embedding [D, C_in, 1, 2, 2]
  "diffusers"       diffusers WanTransformer3DModel safetensors (possibly sharded), Conv3d patch embedding
Everything is first renamed to the original Wan names ("canonical"), then mapped onto turbojax paths. Arrays stay
zero-copy views of the source files; the only reshape (Conv3d -> Linear patch embedding) is a view too.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from convert.common import key_problems, module_tree, rename
from convert.errors import CheckpointError
from turbojax.models.config import PRESETS, WanConfig

LAYOUTS = ("turbodiffusion", "wan", "diffusers")
STRIP_PREFIXES = ("_checkpoint_wrapped_module.", "model.diffusion_model.", "net.", "module.")
QUANT_LINEARS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + ("ffn.0", "ffn.2")
PROJ_L = "self_attn.attn_op.local_attn.proj_l"

# canonical (original Wan) module name -> turbojax path
NON_BLOCK = {
    "patch_embedding": ("patch_embedding",),
    "text_embedding.0": ("text_embedding", "linear_1"),
    "text_embedding.2": ("text_embedding", "linear_2"),
    "time_embedding.0": ("time_embedding", "linear_1"),
    "time_embedding.2": ("time_embedding", "linear_2"),
    "time_projection.1": ("time_projection",),
    "head.head": ("head", "linear"),
}
BLOCK = {
    **{f"{a}.{p}": (a, p) for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o", "norm_q", "norm_k")},
    PROJ_L: ("self_attn", "proj_l"),
    "norm3": ("norm3",),
    "ffn.0": ("ffn", "fc1"),
    "ffn.2": ("ffn", "fc2"),
}

# diffusers name -> canonical name (ordered: first match wins)
DIFFUSERS_RENAMES = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.norm_([qk])\.", r"\1.self_attn.norm_\2."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.norm_([qk])\.", r"\1.cross_attn.norm_\2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
]
# Keys that only Wan2.1's CLIP-conditioned I2V/FLF2V models have; TurboDiffusion uses none of them.
CLIP_MARKERS = ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.", "image_embedder", "add_k_proj", "add_v_proj")
IGNORED_DIFFUSERS = re.compile(r"\.norm_added_q\.")  # present in some hub repos, ignored by diffusers itself


@dataclasses.dataclass(frozen=True)
class Detected:
    layout: str
    quantized: bool
    config: WanConfig
    preset: str | None


def strip_prefixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the wrapper prefixes that training code and ComfyUI repacks add (net., _checkpoint_wrapped_module., ...)."""
    out = {}
    for key, value in tensors.items():
        changed = True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
            key = key.replace("._checkpoint_wrapped_module.", ".")
        out[key] = value
    return out


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
    clip = sorted(k for k in tensors if any(m in k for m in CLIP_MARKERS))
    if clip:
        raise CheckpointError(
            f"this is a CLIP-conditioned Wan2.1 I2V/FLF2V checkpoint ({clip[0]}, ...); turbojax runs the "
            "TurboDiffusion models (Wan2.1 T2V, Wan2.2 I2V-A14B without CLIP), not this one"
        )
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in tensors):
        return "diffusers"
    if any(PROJ_L in k for k in tensors):
        # SLA's proj_l exists only in TurboDiffusion's network, also in its training-side merged files, which
        # still carry a Conv3d-shaped patch embedding (wan-model.md 8.4).
        return "turbodiffusion"
    w = tensors.get("patch_embedding.weight")
    if w is None:
        sample = ", ".join(sorted(tensors)[:5])
        raise CheckpointError(
            "unknown checkpoint layout: no patch_embedding.weight and no diffusers keys; "
            f"expected a Wan DiT (TurboDiffusion .pth, Wan or diffusers). First keys: {sample}"
        )
    if w.ndim == 2:
        return "turbodiffusion"
    if w.ndim == 5:
        return "wan"
    raise CheckpointError(f"patch_embedding.weight has shape {w.shape}; expected [D, 4*C_in] or [D, C_in, 1, 2, 2]")


def to_canonical(tensors: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """Renames a layout's keys to the original Wan names and makes the patch embedding Linear-shaped."""
    if layout == "diffusers":
        tensors = {rename(k, DIFFUSERS_RENAMES): v for k, v in tensors.items() if not IGNORED_DIFFUSERS.search(k)}
    w = tensors.get("patch_embedding.weight")
    if w is not None and w.ndim == 5:
        if w.shape[2:] != (1, 2, 2):
            raise CheckpointError(f"patch_embedding.weight has shape {w.shape}; expected a (1, 2, 2) Conv3d kernel")
        tensors = dict(tensors)
        # Conv3d [D, C, kt, kh, kw] flattened in (c, kt, kh, kw) order is TurboDiffusion's Linear [D, C*kt*kh*kw].
        tensors["patch_embedding.weight"] = w.reshape(w.shape[0], -1)
    return tensors


def _weight(tensors, name):
    for suffix in ("weight", "int8_weight"):
        if f"{name}.{suffix}" in tensors:
            return tensors[f"{name}.{suffix}"]
    raise CheckpointError(f"missing key {name}.weight (needed to infer the model size)")


def _config_value(config_json: dict, key: str, kind: type):
    value = config_json[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise CheckpointError(f"config.json beside the checkpoint has {key}={value!r}; expected a {kind.__name__}. "
                              "Fix the file, or pass the value on the command line where possible (--num-heads)")
    return kind(value)


def _num_heads(dim: int, proj_l_dim: int | None, config_json: dict | None, num_heads: int | None) -> int:
    if num_heads:
        return num_heads
    if config_json:
        for key in ("num_heads", "num_attention_heads"):
            if key in config_json:
                return _config_value(config_json, key, int)
    if proj_l_dim:
        return dim // proj_l_dim
    for cfg in PRESETS.values():
        if cfg.dim == dim:
            return cfg.num_heads
    raise CheckpointError(
        f"cannot tell the head count of a dim-{dim} model: no config.json beside the checkpoint, no SLA proj_l and "
        "no preset of that width; pass --num-heads"
    )


def infer_config(
    tensors: dict[str, np.ndarray],
    layout: str,
    config_json: dict | None = None,
    num_heads: int | None = None,
    preset: str | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> Detected:
    """Model sizes from tensor shapes (canonical keys); head count from --num-heads, config.json, proj_l or preset."""
    patch = _weight(tensors, "patch_embedding")
    dim = patch.shape[0]
    n_patch = math.prod(patch_size)
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError("the checkpoint has no transformer blocks (no blocks.N.* keys)")
    proj = tensors.get(f"blocks.0.{PROJ_L}.weight")
    cfg = WanConfig(
        dim=dim,
        ffn_dim=_weight(tensors, "blocks.0.ffn.0").shape[0],
        num_heads=_num_heads(dim, proj.shape[0] if proj is not None else None, config_json, num_heads),
        num_layers=layers[-1] + 1,
        in_dim=patch.shape[1] // n_patch,
        out_dim=_weight(tensors, "head.head").shape[0] // n_patch,
        text_dim=_weight(tensors, "text_embedding.0").shape[1],
        freq_dim=_weight(tensors, "time_embedding.0").shape[1],
        eps=_config_value(config_json, "eps", float) if config_json and "eps" in config_json else 1e-6,
        patch_size=patch_size,
        sla_proj=proj is not None,
        family="turbodiffusion" if layout == "turbodiffusion" else "wan",
    )
    quantized = any(k.endswith(".int8_weight") for k in tensors)
    matched = [name for name, p in PRESETS.items() if p.replace(sla_proj=cfg.sla_proj, family=cfg.family) == cfg]
    if preset is not None:
        want = PRESETS.get(preset)
        if want is None:
            raise CheckpointError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
        want = want.replace(sla_proj=cfg.sla_proj, family=cfg.family)
        diffs = [f"{f.name} {getattr(cfg, f.name)} (preset {getattr(want, f.name)})"
                 for f in dataclasses.fields(WanConfig) if getattr(cfg, f.name) != getattr(want, f.name)]
        if diffs:
            raise CheckpointError(f"the checkpoint does not match preset {preset}: {'; '.join(diffs)}")
        matched = [preset]
    return Detected(layout, quantized, cfg, matched[0] if matched else None)


def expected_shapes(cfg: WanConfig, quantized: bool) -> dict[str, tuple[int, ...]]:
    """Every canonical key of a checkpoint of this config, with its shape."""
    d, f, hd, n_out = cfg.dim, cfg.ffn_dim, cfg.head_dim, cfg.head_out_dim
    shapes = {
        "patch_embedding.weight": (d, cfg.patch_dim), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (n_out, d), "head.head.bias": (n_out,),
    }
    linears = {**{f"{a}.{p}": (d, d) for a in ("self_attn", "cross_attn") for p in "qkvo"},
               "ffn.0": (f, d), "ffn.2": (d, f)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, d)
        for name, (n, k) in linears.items():
            if quantized:
                shapes[b + name + ".int8_weight"] = (n, k)
                shapes[b + name + ".scale"] = (-(-n // 128), -(-k // 128))
            else:
                shapes[b + name + ".weight"] = (n, k)
            shapes[b + name + ".bias"] = (n,)
        for a in ("self_attn", "cross_attn"):
            shapes[b + a + ".norm_q.weight"] = (d,)
            shapes[b + a + ".norm_k.weight"] = (d,)
        shapes[b + "norm3.weight"] = (d,)
        shapes[b + "norm3.bias"] = (d,)
        if cfg.sla_proj:
            shapes[b + PROJ_L + ".weight"] = (hd, hd)
            shapes[b + PROJ_L + ".bias"] = (hd,)
    return shapes


def validate(tensors: dict[str, np.ndarray], cfg: WanConfig, quantized: bool) -> None:
    """Raises one CheckpointError listing every missing key, unexpected key and shape mismatch."""
    if quantized:
        bf16_linear = re.compile(r"blocks\.\d+\.(%s)\.weight" % "|".join(map(re.escape, QUANT_LINEARS)))
        mixed = sorted(k for k in tensors if bf16_linear.fullmatch(k))
        if mixed:
            raise CheckpointError(
                f"the checkpoint mixes quantised and bf16 block Linears ({mixed[0]} is not int8); "
                "use a complete -quant file or the bf16 file"
            )
    problems = key_problems(tensors, expected_shapes(cfg, quantized))
    if problems:
        raise CheckpointError(
            f"the checkpoint does not match a {cfg.num_layers}-layer dim-{cfg.dim} Wan DiT: " + "; ".join(problems)
        )


def embeddings_tree(tensors: dict[str, np.ndarray]) -> dict:
    """The non-block parameters as a turbojax tree."""
    return module_tree({k: v for k, v in tensors.items() if not k.startswith("blocks.")}, NON_BLOCK,
                       {"head.modulation": ("head", "modulation")})


def block_tree(tensors: dict[str, np.ndarray], i: int) -> dict:
    """Block i's parameters as a turbojax tree (int8 Linears keep int8_weight + scale)."""
    prefix = f"blocks.{i}."
    return module_tree({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, BLOCK,
                       {"modulation": ("modulation",)})
