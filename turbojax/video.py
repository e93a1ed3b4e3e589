"""Video and image I/O with the reference's conventions (acceleration.md 2.7 and 7).

- `to_uint8`: pixels in [-1, 1] -> uint8 exactly like TurboDiffusion's save path: clamp, (1 + x) / 2, then
  uint8(y * 255 + 0.5) in fp32, the cast truncating (round half up on [0, 255]). Computed on the host with numpy,
  one fp32 operation at a time as torch/numpy do; a fused device kernel could contract y * 255 + 0.5 into one FMA
  and move values that sit on a rounding boundary. `frames_uint8` is the same mapping on the device for decoded
  videos, split into two programs so that no FMA can form.
- `save_video`: H.264 mp4 through imageio-ffmpeg (libx264, crf 25 from quality 5, yuv420p, 16 fps, no resizing:
  macro_block_size 1), a batch tiled side by side, written under a temporary name and renamed when complete.
- `load_image` / `image_to_video`: the I2V input (PIL RGB, bilinear resize with antialiasing, stretched, to [-1, 1];
  then the image followed by zero frames).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

FPS = 16
QUALITY = 5  # imageio-ffmpeg maps it to libx264 -crf int((1 - 5/10) * 51) = 25
# PIL modes that convert("RGB") maps without losing range; 16/32-bit integer and float images would be clipped.
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def to_uint8(x) -> np.ndarray:
    """Pixels in [-1, 1] (any float dtype, any shape) -> uint8 with the reference's mapping, on the host."""
    y = (1.0 + np.clip(np.asarray(x, np.float32), -1.0, 1.0)) / 2.0
    return (y * 255.0 + 0.5).astype(np.uint8)


@jax.jit
def _scaled(pixels: jax.Array) -> jax.Array:
    """(1 + clip(x)) / 2 * 255 in fp32, each operation rounded as numpy rounds it (no add follows a multiply here,
    so nothing can be contracted into an FMA)."""
    return (1.0 + jnp.clip(pixels.astype(jnp.float32), -1.0, 1.0)) / 2.0 * 255.0


@jax.jit
def _levels(scaled: jax.Array) -> jax.Array:
    """uint8(scaled + 0.5), truncating, [B, 3, T, H, W] -> [B, T, H, W, 3]. A program of its own, so the + 0.5
    cannot fuse with the multiply of `_scaled` into an FMA."""
    return (scaled + 0.5).astype(jnp.uint8).transpose(0, 2, 3, 4, 1)


def frames_uint8(pixels: jax.Array) -> np.ndarray:
    """Decoded video [B, 3, T, H, W] on the device -> uint8 frames [B, T, H, W, 3] on the host, bit for bit
    `to_uint8` but computed on the device, a frame at a time (the fp32 intermediate stays one frame, not a second
    copy of the video beside the decoded one); only uint8 crosses to the host."""
    frames = [_levels(_scaled(pixels[:, :, t:t + 1])) for t in range(pixels.shape[2])]
    return np.concatenate(jax.device_get(frames), axis=1)


def tile_batch(video: np.ndarray) -> np.ndarray:
    """[B, 3, T, H, W] -> [3, T, H, B*W]: samples side by side, like the reference's '(n b) c t h w -> c t h (b w)'."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2, 3, 0, 4).reshape(c, t, h, b * w)


def save_video(path: str | os.PathLike, video, *, fps: int = FPS) -> Path:
    """Writes video [3, T, H, W] or [B, 3, T, H, W] (pixels in [-1, 1], numpy or jax) as an H.264 mp4.

    The file appears only when complete: frames go to a temporary sibling that is renamed at the end and removed on
    any error, so a failure never leaves a partial mp4 (an existing file at `path` is kept until the rename)."""
    _check_mp4_path(path)
    video = np.asarray(jax.device_get(video))
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [3, T, H, W] or [B, 3, T, H, W], got shape {video.shape}")
    frames = tile_batch(video)  # [3, T, H, W']
    return write_mp4(path, (to_uint8(frames[:, i]).transpose(1, 2, 0) for i in range(frames.shape[1])),
                     frames.shape[2:], fps=fps)


def _check_mp4_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: turbojax writes H.264 mp4; give a path ending in .mp4")
    return path


def write_mp4(path: str | os.PathLike, frames, size: tuple[int, int], *, fps: int = FPS) -> Path:
    """Writes uint8 RGB frames (an iterable of [H, W, 3], size = (H, W)) as an H.264 mp4, atomically like
    save_video: under a temporary sibling name, renamed when complete, removed on any error."""
    path = _check_mp4_path(path)
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"frames of {h}x{w}: need an even height and width (yuv420p)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.partial-{os.getpid()}{path.suffix}"
    try:
        import imageio_ffmpeg  # here, not at module level: only writing needs the ffmpeg binary
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, quality=QUALITY, codec="libx264", pix_fmt_out="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error",
        )
        with warnings.catch_warnings():
            # JAX warns on every fork(); subprocess's fork is followed at once by exec of ffmpeg, which is safe.
            warnings.filterwarnings("ignore", "os.fork\\(\\) was called", RuntimeWarning)
            writer.send(None)  # starts ffmpeg
        count = 0
        try:
            for frame in frames:
                if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
                    raise ValueError(f"frame {count} is {frame.dtype} {frame.shape}; expected uint8 {(h, w, 3)}")
                writer.send(np.ascontiguousarray(frame))
                count += 1
        finally:
            writer.close()
        if count == 0:
            raise ValueError("no frames to write: need at least 1")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _open_image(path: str | os.PathLike):
    """The PIL image at path, opened lazily (a context manager), or one clear error: missing, unreadable, or samples
    that RGB conversion would clip."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} cannot be read as an image ({e})") from None
    if img.mode not in IMAGE_MODES:
        img.close()
        raise ValueError(f"{path} is a {img.mode!r} image (16/32-bit or float samples); save it as 8-bit RGB first")
    return img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, with load_image's checks (the I2V adaptive resolution needs it first)."""
    with _open_image(path) as img:
        return img.size


def load_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """An image file -> [3, height, width] float32 in [-1, 1], the I2V conditioning frame.

    Like the reference: PIL RGB (alpha dropped), resized to exactly (height, width), stretched rather than cropped,
    with PIL's bilinear filter, which widens its support when shrinking (antialiasing; torchvision's uint8
    antialiased resize reproduces it up to rounding); then uint8 / 255, normalised with mean 0.5 and std 0.5."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height {height}, width {width}")
    with _open_image(path) as img:
        try:
            rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except OSError as e:  # a truncated file fails only when its pixels are decoded
            raise ValueError(f"{path} cannot be read as an image ({e})") from None
    u = np.asarray(rgb, np.uint8).transpose(2, 0, 1)
    return (u.astype(np.float32) / 255.0 - 0.5) / 0.5


def image_to_video(image, num_frames: int, dtype=jnp.float32) -> jax.Array:
    """The I2V video to encode: image [3, H, W] followed by num_frames - 1 zero (mid-grey) frames -> [1, 3, F, H, W]."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 1 + 4k (e.g. 81), got {num_frames}")
    image = jnp.asarray(image, dtype)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {image.shape}")
    zeros = jnp.zeros((3, num_frames - 1, *image.shape[1:]), dtype)
    return jnp.concatenate([image[:, None], zeros], axis=1)[None]
