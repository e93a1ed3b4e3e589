"""Video sizes (acceleration.md 1 and 2.7): the resolution / aspect-ratio table, I2V adaptive resolution, frame counts.

Sizes are given as the spec's table gives them, (width, height); functions return (height, width) like the arrays.
"""

from __future__ import annotations

import numpy as np

# TurboDiffusion's VIDEO_RES_SIZE_INFO rows used by its scripts; "tiny" is turbojax's smoke-test size (about 1/10 of
# 480p, multiples of 16) for the embedded tiny preset on CPU.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960)},
    "tiny": {"16:9": (80, 48), "9:16": (48, 80), "1:1": (64, 64), "4:3": (64, 48), "3:4": (48, 64)},
}
STRIDE = 16  # pixels per DiT token side: VAE 8 x patch 2
VAE_TIME = 4  # pixel frames per latent frame after the first
LATENT_CHANNELS = 16


def table_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a table entry, e.g. ("480p", "16:9") -> (480, 832)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unsupported resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    row = RESOLUTIONS[resolution]
    if aspect_ratio not in row:
        raise ValueError(f"unsupported aspect ratio {aspect_ratio!r} (W:H); choose one of {', '.join(row)}")
    width, height = row[aspect_ratio]
    return height, width


def snap(x: float, stride: int = STRIDE) -> int:
    """x rounded to a multiple of stride, ties to even like the reference (numpy / Python 3 round of x / stride)."""
    return int(np.round(np.float64(x) / stride)) * stride


def adaptive_size(image_size: tuple[int, int], resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """I2V adaptive resolution: (height, width) with about the table entry's area A and the image's aspect ratio
    ar = H_img / W_img: h = round(sqrt(A ar) / 16) 16, w = round(sqrt(A / ar) / 16) 16. image_size is (W, H)."""
    base_h, base_w = table_size(resolution, aspect_ratio)
    img_w, img_h = image_size
    area, ar = base_w * base_h, img_h / img_w
    height, width = snap(np.sqrt(area * ar)), snap(np.sqrt(area / ar))
    if height < STRIDE or width < STRIDE:
        raise ValueError(f"unsupported size: an image of {img_w}x{img_h} gives a {width}x{height} video at "
                         f"{resolution}; its aspect ratio is too extreme (each side needs >= {STRIDE} pixels)")
    return height, width


def check_num_frames(num_frames: int) -> None:
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % VAE_TIME:
        raise ValueError(f"num_frames must be 4k+1 (e.g. 81, 77, 49, 17, 5), got {num_frames}")


def latent_shape(num_samples: int, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """The sampler's latents [B, 16, 1 + (F - 1)/4, H/8, W/8] for num_frames F = 4k+1 pixel frames of H x W."""
    return (num_samples, LATENT_CHANNELS, 1 + (num_frames - 1) // VAE_TIME, height // 8, width // 8)
