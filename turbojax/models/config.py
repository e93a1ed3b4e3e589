"""Wan DiT configurations: the released presets, the tiny test preset, and the parameter count formula."""

from __future__ import annotations

import dataclasses

# TurboDiffusion's network keeps a bf16 residual stream and rounds each fused norm once; stock Wan (and the diffusers
# port of it) keeps the residual in fp32 and rounds the q/k RMSNorm before its weight multiply (spec wan-model.md 4.1).
FAMILIES = ("turbodiffusion", "wan")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture of one Wan DiT. Sizes follow wan-model.md 1.1; every Wan model uses head_dim 128."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # SLA-tuned checkpoints carry one proj_l Linear(head_dim, head_dim) per self-attention layer.
    sla_proj: bool = True
    family: str = "turbodiffusion"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Input features of one patch token: in_dim * kt * kh * kw."""
        pt, ph, pw = self.patch_size
        return self.in_dim * pt * ph * pw

    @property
    def head_out_dim(self) -> int:
        """Output features of one patch token: out_dim * kt * kh * kw (64 for every Wan model)."""
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw

    @property
    def cond_dim(self) -> int:
        """Channels of the I2V condition concatenated after the 16 noise channels (0 for T2V)."""
        return self.in_dim - self.out_dim

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2-i2v-a14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
    # Small enough for CPU tests and the demo; head_dim 12 gives every RoPE axis (t, h, w) two frequency pairs.
    "tiny": WanConfig(dim=24, ffn_dim=32, num_heads=2, num_layers=2, text_dim=32),
}


def get_preset(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def param_count(cfg: WanConfig) -> int:
    """Number of parameters of the DiT, including proj_l when cfg.sla_proj (wan-model.md 1.1)."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = lambda n_in, n_out: n_in * n_out + n_out
    embeddings = (
        linear(cfg.patch_dim, d)
        + linear(cfg.text_dim, d) + linear(d, d)
        + linear(cfg.freq_dim, d) + linear(d, d)
        + linear(d, 6 * d)
    )
    head = 2 * d + linear(d, cfg.head_out_dim)
    block = (
        6 * d  # modulation
        + 8 * linear(d, d)  # self/cross q, k, v, o
        + 4 * d  # self/cross norm_q, norm_k
        + 2 * d  # norm3 weight and bias
        + linear(d, f) + linear(f, d)
    )
    if cfg.sla_proj:
        block += linear(cfg.head_dim, cfg.head_dim)
    return embeddings + head + cfg.num_layers * block
