"""The Wan2.1 VAE checkpoint layouts and their mapping onto turbojax's VAE tree.

Layouts (wan-model.md 7.5):
  "wan"        Wan2.1_VAE.pth: the WanVAE_ state dict (encoder.downsamples.i.residual.N.*, middle.*, head.*, and the
               top-level conv1/conv2)
  "diffusers"  AutoencoderKLWan safetensors (encoder.down_blocks.i.norm1.*, mid_block.*, up_blocks.b.resnets.r.*,
               quant_conv/post_quant_conv)
Keys are first renamed to the Wan names ("canonical") and checked against the shapes the inferred config needs; then
each tensor moves to its turbojax path, PyTorch's conv layout [out, in, *kernel] becoming [*kernel, in, out] and the
RMS gains [C, 1, 1(, 1)] becoming [C]. Arrays stay views of the source files until the writer copies them.
"""

from __future__ import annotations

import re

import numpy as np

from convert.common import key_problems, nest
from convert.errors import CheckpointError
from turbojax.models.vae import VAEConfig, decoder_plan, encoder_plan

LAYOUTS = ("wan", "diffusers")
_VAE_KEY = re.compile(r"^(encoder|decoder)\.(conv1|conv_in|downsamples|down_blocks|upsamples|up_blocks|middle|"
                      r"mid_block|head|norm_out|conv_out)\.")
_WAN22_KEY = re.compile(r"^(encoder\.downsamples\.\d+\.downsamples|encoder\.down_blocks\.\d+\.resnets|"
                        r"decoder\.upsamples\.\d+\.upsamples)\.")
_DIFFUSERS_KEY = re.compile(r"^(quant_conv|post_quant_conv|(encoder|decoder)\.(conv_in|mid_block|down_blocks|up_blocks|"
                            r"norm_out|conv_out))\.")

# diffusers residual-block names -> Wan's Sequential indices
_RES_FROM_DIFFUSERS = [("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                       ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]
_ENDS_FROM_DIFFUSERS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
# Wan residual-block names -> turbojax ResBlock paths
_RES_TO_TREE = {"residual.0": ("norm1",), "residual.2": ("conv1",), "residual.3": ("norm2",), "residual.6": ("conv2",),
                "shortcut": ("shortcut",)}


def is_vae(tensors: dict[str, np.ndarray]) -> bool:
    """True for a Wan VAE state dict in either layout (no DiT or text-encoder key looks like these)."""
    return any(_VAE_KEY.match(k) or k.startswith(("quant_conv.", "post_quant_conv.")) for k in tensors)


def detect_layout(tensors: dict[str, np.ndarray], config_json: dict | None = None) -> str:
    wan22 = sorted(k for k in tensors if _WAN22_KEY.match(k))
    if wan22 or (config_json or {}).get("is_residual"):
        raise CheckpointError(
            f"this is the Wan2.2 VAE (residual down/up blocks{', e.g. ' + wan22[0] if wan22 else ''}), used only by "
            "TI2V-5B; turbojax runs the Wan2.1 VAE (Wan2.1_VAE.pth), which every TurboDiffusion model uses"
        )
    return "diffusers" if any(_DIFFUSERS_KEY.match(k) for k in tensors) else "wan"


def _res_from_diffusers(rest: str) -> str:
    for old, new in _RES_FROM_DIFFUSERS:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _from_diffusers(key: str, per_stage: int) -> str:
    """One diffusers key -> its Wan name; per_stage = resnets + 1 upsampler per decoder up block."""
    if m := re.match(r"^(quant_conv|post_quant_conv)\.(.*)$", key):
        return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[m[1]] + "." + m[2]
    if m := re.match(r"^(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.*)$", key):
        return f"{m[1]}.{_ENDS_FROM_DIFFUSERS[m[2]]}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_res_from_diffusers(m[3])}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", key):
        return f"encoder.downsamples.{m[1]}.{_res_from_diffusers(m[2])}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.{_res_from_diffusers(m[3])}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * per_stage + per_stage - 1}.{m[2]}"
    return key  # left for validate() to report as unexpected


def to_canonical(tensors: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """Renames a layout's keys to the Wan names (diffusers keeps the encoder's flat index; the decoder's up blocks
    b.resnets.r / b.upsamplers.0 flatten to b * (resnets + 1) + r / + resnets)."""
    if layout == "wan":
        return dict(tensors)
    resnets = {int(m[1]) for k in tensors if (m := re.match(r"^decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", k))}
    per_stage = (max(resnets) + 1 if resnets else 0) + 1
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        new = _from_diffusers(key, per_stage)
        if new in out:
            raise CheckpointError(f"keys {key} and another both map to {new}; the checkpoint is not a Wan VAE")
        out[new] = value
    return out


def _shape(tensors: dict[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"missing key {key} (needed to infer the VAE size)")
    return tuple(tensors[key].shape)


def infer_config(tensors: dict[str, np.ndarray], config_json: dict | None = None) -> VAEConfig:
    """The VAE's sizes from canonical tensor shapes; a diffusers config.json beside the checkpoint must agree."""
    base = _shape(tensors, "encoder.conv1.weight")[0]
    z_dim = _shape(tensors, "decoder.conv1.weight")[1]
    entries = sorted({int(m[1]) for k in tensors if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))})
    resample = [i for i in entries if f"encoder.downsamples.{i}.resample.1.weight" in tensors]
    num_res_blocks = resample[0] if resample else len(entries)
    levels = len(resample) + 1
    dim_mult = []
    for level in range(levels):
        first = level * (num_res_blocks + 1)
        dim_mult.append(_shape(tensors, f"encoder.downsamples.{first}.residual.2.weight")[0] // base)
    cfg = VAEConfig(
        base_dim=base, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
        temporal_downsample=tuple(f"encoder.downsamples.{i}.time_conv.weight" in tensors for i in resample),
    )
    if config_json and config_json.get("_class_name") == "AutoencoderKLWan":
        declared = {"base_dim": config_json.get("base_dim"), "z_dim": config_json.get("z_dim"),
                    "dim_mult": tuple(config_json.get("dim_mult", ())),
                    "num_res_blocks": config_json.get("num_res_blocks"),
                    "temporal_downsample": tuple(config_json.get("temperal_downsample", ()))}
        diffs = [f"{k} {getattr(cfg, k)} (config.json {v})" for k, v in declared.items() if getattr(cfg, k) != v]
        if diffs:
            raise CheckpointError(f"the weights do not match the config.json beside them: {'; '.join(diffs)}")
    return cfg


def _res_shapes(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    s = {f"{prefix}.residual.0.gamma": (c_in, 1, 1, 1),
         f"{prefix}.residual.2.weight": (c_out, c_in, 3, 3, 3), f"{prefix}.residual.2.bias": (c_out,),
         f"{prefix}.residual.3.gamma": (c_out, 1, 1, 1),
         f"{prefix}.residual.6.weight": (c_out, c_out, 3, 3, 3), f"{prefix}.residual.6.bias": (c_out,)}
    if c_in != c_out:
        s.update({f"{prefix}.shortcut.weight": (c_out, c_in, 1, 1, 1), f"{prefix}.shortcut.bias": (c_out,)})
    return s


def _stage_shapes(prefix: str, plan: list[tuple]) -> dict[str, tuple[int, ...]]:
    s = {}
    for i, entry in enumerate(plan):
        p = f"{prefix}.{i}"
        if entry[0] == "res":
            s.update(_res_shapes(p, entry[1], entry[2]))
            continue
        mode, c = entry
        c_out = c // 2 if mode.startswith("up") else c
        s.update({f"{p}.resample.1.weight": (c_out, c, 3, 3), f"{p}.resample.1.bias": (c_out,)})
        time_out = {"down3d": c, "up3d": 2 * c}.get(mode)
        if time_out:
            s.update({f"{p}.time_conv.weight": (time_out, c, 3, 1, 1), f"{p}.time_conv.bias": (time_out,)})
    return s


def _middle_shapes(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {**_res_shapes(f"{prefix}.middle.0", c, c), **_res_shapes(f"{prefix}.middle.2", c, c),
            f"{prefix}.middle.1.norm.gamma": (c, 1, 1),
            f"{prefix}.middle.1.to_qkv.weight": (3 * c, c, 1, 1), f"{prefix}.middle.1.to_qkv.bias": (3 * c,),
            f"{prefix}.middle.1.proj.weight": (c, c, 1, 1), f"{prefix}.middle.1.proj.bias": (c,)}


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical (Wan) key of a VAE of this config, with its PyTorch shape."""
    top, out_dim, z = cfg.base_dim * cfg.dim_mult[-1], cfg.base_dim * cfg.dim_mult[0], cfg.z_dim
    return {
        "encoder.conv1.weight": (cfg.base_dim, 3, 3, 3, 3), "encoder.conv1.bias": (cfg.base_dim,),
        **_stage_shapes("encoder.downsamples", encoder_plan(cfg)),
        **_middle_shapes("encoder", top),
        "encoder.head.0.gamma": (top, 1, 1, 1),
        "encoder.head.2.weight": (2 * z, top, 3, 3, 3), "encoder.head.2.bias": (2 * z,),
        "conv1.weight": (2 * z, 2 * z, 1, 1, 1), "conv1.bias": (2 * z,),
        "conv2.weight": (z, z, 1, 1, 1), "conv2.bias": (z,),
        "decoder.conv1.weight": (top, z, 3, 3, 3), "decoder.conv1.bias": (top,),
        **_middle_shapes("decoder", top),
        **_stage_shapes("decoder.upsamples", decoder_plan(cfg)),
        "decoder.head.0.gamma": (out_dim, 1, 1, 1),
        "decoder.head.2.weight": (3, out_dim, 3, 3, 3), "decoder.head.2.bias": (3,),
    }


def validate(tensors: dict[str, np.ndarray], cfg: VAEConfig) -> None:
    """Raises one CheckpointError listing every missing key, unexpected key and shape mismatch."""
    problems = key_problems(tensors, expected_shapes(cfg))
    if problems:
        raise CheckpointError(
            f"the checkpoint does not match a Wan2.1 VAE with base_dim {cfg.base_dim}, z_dim {cfg.z_dim}, "
            f"dim_mult {list(cfg.dim_mult)}, {cfg.num_res_blocks} res blocks: " + "; ".join(problems)
        )


def _tree_path(key: str) -> tuple[str, ...]:
    """A canonical key -> its turbojax path (list indices as strings): 'decoder.upsamples.3.time_conv.bias' ->
    ('decoder', 'up', '3', 'time_conv', 'bias')."""
    module, leaf = key.rsplit(".", 1)
    if module in ("conv1", "conv2"):
        return ({"conv1": "quant_conv", "conv2": "post_quant_conv"}[module], leaf)
    side, rest = module.split(".", 1)
    if rest == "conv1":
        return side, "conv_in", leaf
    if rest in ("head.0", "head.2"):
        return side, "norm_out" if rest == "head.0" else "conv_out", leaf
    if m := re.fullmatch(r"middle\.1\.(norm|to_qkv|proj)", rest):
        return side, "mid", "attn", m[1], leaf
    if m := re.fullmatch(r"middle\.([02])\.(.*)", rest):
        return side, "mid", f"res{int(m[1]) // 2}", *_RES_TO_TREE[m[2]], leaf
    m = re.fullmatch(r"(downsamples|upsamples)\.(\d+)\.(.*)", rest)
    stage = "down" if m[1] == "downsamples" else "up"
    inner = {"resample.1": ("conv",), "time_conv": ("time_conv",)}.get(m[3]) or _RES_TO_TREE[m[3]]
    return side, stage, m[2], *inner, leaf


def _to_jax_layout(key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith(".gamma"):
        return value.reshape(value.shape[0])
    if value.ndim >= 3:  # conv weight [out, in, *kernel] -> [*kernel, in, out]
        return value.transpose(*range(2, value.ndim), 1, 0)
    return value


def to_tree(tensors: dict[str, np.ndarray]) -> dict:
    """Validated canonical tensors -> the nested turbojax tree that checkpoint.write_vae_checkpoint saves."""
    return nest({_tree_path(key): _to_jax_layout(key, value) for key, value in tensors.items()})
