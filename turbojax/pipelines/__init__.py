"""End-to-end pipelines: T2VPipeline (Wan2.1 T2V) and I2VPipeline (Wan2.2 I2V-A14B), and their sizes and options."""

from turbojax.pipelines.pipeline import (
    I2V_DEFAULTS,
    T2V_DEFAULTS,
    I2VPipeline,
    Plan,
    T2VPipeline,
    Video,
    attention_spec,
    plan,
)
from turbojax.pipelines.sizes import RESOLUTIONS, adaptive_size, table_size

__all__ = [
    "I2VPipeline",
    "I2V_DEFAULTS",
    "Plan",
    "RESOLUTIONS",
    "T2VPipeline",
    "T2V_DEFAULTS",
    "Video",
    "adaptive_size",
    "attention_spec",
    "plan",
    "table_size",
]
