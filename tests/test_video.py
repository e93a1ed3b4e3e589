"""Video and image I/O: the reference's uint8 mapping, mp4 round trips, atomic writes, I2V image loading."""

import imageio.v2 as imageio
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

import turbojax
from turbojax import video as video_mod


def _reference_uint8(x: float) -> int:
    """TurboDiffusion's mapping one fp32 operation at a time: clamp, (1 + x) / 2, then uint8(y * 255 + 0.5)."""
    f = np.float32
    y = (f(1.0) + f(min(max(x, -1.0), 1.0))) / f(2.0)
    return int(f(f(y * f(255.0)) + f(0.5)))


def test_to_uint8_is_the_reference_mapping():
    k = np.arange(256)
    # Values that decode exactly to level k map back to k; clamping outside [-1, 1].
    exact = (k / 127.5 - 1.0).astype(np.float32)
    assert np.array_equal(turbojax.to_uint8(exact), k)
    assert turbojax.to_uint8(np.float32([-1.0, -3.0, 0.0, 1.0, 7.0])).tolist() == [0, 0, 128, 255, 255]
    # Truncation, not rounding: y * 255 + 0.5 = 10.99 -> 10.
    assert turbojax.to_uint8(np.float32([2 * 10.49 / 255 - 1]))[0] == 10
    # Every rounding boundary (y * 255 = k + 0.5) and its fp32 neighbours, against the op-by-op scalar reference.
    bound = (2 * (k[:-1] + 0.5) / 255 - 1).astype(np.float32)
    probes = np.concatenate([bound, np.nextafter(bound, np.float32(-2)), np.nextafter(bound, np.float32(2))])
    assert turbojax.to_uint8(probes).tolist() == [_reference_uint8(float(p)) for p in probes]
    # bf16 decoder output goes through the same fp32 arithmetic.
    assert np.array_equal(turbojax.to_uint8(exact.astype(ml_dtypes.bfloat16)),
                          turbojax.to_uint8(exact.astype(ml_dtypes.bfloat16).astype(np.float32)))


def test_frames_uint8_on_the_device_is_to_uint8():
    """The device mapping equals the host reference bit for bit (every level, every rounding boundary and its
    neighbours, clamping, bf16 input) and lays the frames out [B, T, H, W, 3]."""
    k = np.arange(256)
    bound = (2 * (k[:-1] + 0.5) / 255 - 1).astype(np.float32)
    values = np.concatenate([(k / 127.5 - 1.0).astype(np.float32), bound, np.nextafter(bound, np.float32(-2)),
                             np.nextafter(bound, np.float32(2)), np.float32([-3.0, 7.0, 0.0])])
    rng = np.random.default_rng(0)
    values = np.concatenate([values, rng.uniform(-1.1, 1.1, 2 * 3 * 5 * 4 * 8 * 3 - values.size).astype(np.float32)])
    video = rng.permutation(values).reshape(2, 3, 5, 4 * 8, 3)
    for x in (video, video.astype(ml_dtypes.bfloat16)):
        got = video_mod.frames_uint8(jnp.asarray(x))
        assert got.dtype == np.uint8 and got.shape == (2, 5, 32, 3, 3)
        np.testing.assert_array_equal(got, turbojax.to_uint8(x).transpose(0, 2, 3, 4, 1))


def _gradient_video(batch=2, frames=9, h=16, w=24) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1]: smooth ramps, sample b offset so the tiles differ."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
    base = np.stack([x / w, y / h, t / frames])  # [3, T, H, W] in [0, 1)
    return np.stack([(0.6 * base + 0.4 * b) * 2 - 1 for b in range(batch)]).astype(np.float32)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio's reader starts ffmpeg (fork + exec)
def test_mp4_round_trip(tmp_path):
    video = _gradient_video()
    path = turbojax.save_video(tmp_path / "out.mp4", video)
    assert path == tmp_path / "out.mp4" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    with imageio.get_reader(path, "ffmpeg") as reader:
        meta = reader.get_meta_data()
        frames = np.stack(list(reader.iter_data()))
    assert meta["fps"] == 16 and meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (48, 16)  # two 24-pixel-wide samples side by side
    assert frames.shape == (9, 16, 48, 3)
    want = turbojax.to_uint8(video_mod.tile_batch(video)).transpose(1, 2, 3, 0)
    # Lossy H.264 (crf 25, 4:2:0 chroma) moves levels by ~3 on average; a channel swap or transposed tiles by ~60.
    assert np.abs(frames.astype(int) - want).mean() < 5
    assert np.abs(frames[..., ::-1].astype(int) - want).mean() > 20


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous video")
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return np.zeros(np.shape(x), np.uint8)

    monkeypatch.setattr(video_mod, "to_uint8", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        turbojax.save_video(target, _gradient_video())
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and target.read_bytes() == b"previous video"


@pytest.mark.parametrize("name, shape, match", [
    ("out.avi", (3, 9, 16, 24), "ending in .mp4"),
    ("out.mp4", (9, 16, 24), r"\[3, T, H, W\] or \[B, 3, T, H, W\]"),
    ("out.mp4", (1, 4, 9, 16, 24), r"\[3, T, H, W\] or \[B, 3, T, H, W\]"),
    ("out.mp4", (3, 9, 16, 25), "even height and width"),
])
def test_save_video_rejects_bad_input(tmp_path, name, shape, match):
    with pytest.raises(ValueError, match=match):
        turbojax.save_video(tmp_path / name, np.zeros(shape, np.float32))
    assert not list(tmp_path.iterdir())


def _save(tmp_path, img: Image.Image, name="img.png"):
    path = tmp_path / name
    img.save(path)
    return path


def test_load_image_stretches_to_the_requested_size(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 128)  # left half
    rgb[:, 20:] = (0, 255, 0)
    x = turbojax.load_image(_save(tmp_path, Image.fromarray(rgb)), 16, 24)  # different aspect ratio: no crop
    assert x.shape == (3, 16, 24) and x.dtype == np.float32
    b = np.float32((np.float32(128) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
    assert np.array_equal(x[:, :, :11], np.broadcast_to(np.float32([1, -1, b])[:, None, None], (3, 16, 11)))
    assert np.array_equal(x[:, :, 13:], np.broadcast_to(np.float32([-1, 1, -1])[:, None, None], (3, 16, 11)))


def test_load_image_antialiases_when_shrinking(tmp_path):
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    x = turbojax.load_image(_save(tmp_path, Image.fromarray(checker, "L")), 8, 8)
    assert np.abs(x).max() < 0.05  # an average of the 1-pixel checkerboard, not a sample of it
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])  # grey -> equal RGB


def test_load_image_drops_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: the reference's convert("RGB") keeps the colour
    x = turbojax.load_image(_save(tmp_path, Image.fromarray(rgba, "RGBA")), 8, 8)
    assert np.all(x[0] == 1) and np.all(x[1:] == -1)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_load_image_refuses_high_bit_depth(tmp_path, mode):
    img = Image.new(mode, (8, 8))
    path = _save(tmp_path, img, "img.tiff")
    with pytest.raises(ValueError, match=f"is a '{mode}' image .* save it as 8-bit RGB"):
        turbojax.load_image(path, 8, 8)


def test_load_image_unreadable_files(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png cannot be read as an image"):
        turbojax.load_image(tmp_path / "text.png", 8, 8)
    full = _save(tmp_path, Image.fromarray(np.full((64, 64, 3), 7, np.uint8)), "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="cut.png cannot be read as an image"):
        turbojax.load_image(tmp_path / "cut.png", 8, 8)
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        turbojax.load_image(tmp_path / "missing.png", 8, 8)
    with pytest.raises(ValueError, match="must be positive"):
        turbojax.load_image(tmp_path / "full.png", 0, 8)


def test_image_to_video():
    image = np.random.default_rng(0).uniform(-1, 1, (3, 16, 24)).astype(np.float32)
    v = turbojax.image_to_video(image, 9)
    assert v.shape == (1, 3, 9, 16, 24)
    assert np.array_equal(v[0, :, 0], image) and not np.any(v[0, :, 1:])
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        turbojax.image_to_video(image, 8)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        turbojax.image_to_video(image[None], 9)
