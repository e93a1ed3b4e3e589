"""What the kernels' dispatchers ask of the default device (pallas_kernels does not depend on turbojax)."""

from __future__ import annotations

import jax

H100_SMS = 132  # an H100 SXM's SM count: the grid size used where no GPU is the default device


def default_is_hopper() -> bool:
    """Whether the default device is an sm90 (Hopper) GPU: wgmma, TMA, the Mosaic GPU kernels."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def num_sms() -> int:
    """The default GPU's SM count; H100_SMS where the default device is not a GPU (lowering or interpreting a
    kernel on a CPU host, as the tests do)."""
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else H100_SMS
