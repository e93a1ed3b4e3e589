"""T2V and I2V pipelines on CPU with the embedded tiny preset: sizes, options, end to end to an mp4, seeds, the
expert order and the A14B memory plan, the text encoder's lifetime."""

import warnings

import imageio
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import turbojax
from turbojax.pipelines import I2VPipeline, T2VPipeline, adaptive_size, plan, table_size
from turbojax.pipelines import pipeline as pipeline_module
from turbojax.pipelines.experts import USABLE, both_fit
from turbojax.pipelines.sizes import latent_shape, snap

PROMPT = "A red fox trots through fresh snow at dawn."


def read_mp4(path) -> tuple[np.ndarray, dict]:
    """Decoded frames [T, H, W, 3] uint8 and ffmpeg's metadata of an mp4."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # imageio's reader starts ffmpeg (fork + exec)
        with imageio.get_reader(path, "ffmpeg") as reader:
            return np.stack(list(reader.iter_data())), reader.get_meta_data()


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, aspect, hw", [
    ("480p", "16:9", (480, 832)), ("480p", "9:16", (832, 480)), ("480p", "1:1", (640, 640)),
    ("480p", "4:3", (480, 640)), ("720p", "16:9", (720, 1280)), ("720p", "3:4", (960, 720)),
])
def test_table_sizes_follow_the_spec(resolution, aspect, hw):
    assert table_size(resolution, aspect) == hw


def test_latent_shape_and_tokens_of_81_frames_at_480p():
    shape = latent_shape(1, 81, 480, 832)
    assert shape == (1, 16, 21, 60, 104)
    assert shape[2] * (shape[3] // 2) * (shape[4] // 2) == 32760  # spec 1: L = 21 * 30 * 52


def test_snap_rounds_half_to_even():
    assert snap(552) == 544  # 34.5 -> 34
    assert snap(568) == 576  # 35.5 -> 36
    assert snap(553) == 560 and snap(551) == 544


def test_adaptive_size_of_a_4_3_image_at_480p():
    # A = 832 * 480, ar = 0.75: sqrt(A ar) = 547.3 -> 34.2 * 16 -> 544; sqrt(A / ar) = 729.7 -> 45.6 * 16 -> 736.
    assert adaptive_size((1000, 750), "480p", "16:9") == (544, 736)


@pytest.mark.parametrize("w, h", [(1000, 750), (750, 1000), (1920, 1080), (1080, 1920), (512, 512), (333, 1001),
                                  (4000, 1000), (1200, 1201)])
@pytest.mark.parametrize("resolution", ["480p", "720p"])
def test_adaptive_size_matches_the_reference_formula(w, h, resolution):
    # Transcription of wan2.2_i2v_infer.py: Python's round on numpy floats (ties to even), stride 16.
    base_w, base_h = {"480p": (832, 480), "720p": (1280, 720)}[resolution]
    ar = h / w
    ref = (round(np.sqrt(base_w * base_h * ar) / 16) * 16, round(np.sqrt(base_w * base_h / ar) / 16) * 16)
    assert adaptive_size((w, h), resolution, "16:9") == ref


def test_adaptive_size_refuses_extreme_aspect_ratios():
    with pytest.raises(ValueError, match="unsupported size"):
        adaptive_size((100000, 10), "480p", "16:9")


# ---------------------------------------------------------------------------------------------------------------
# Options: one clear error per bad input, before any model runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (750, 1000, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind, prompt, image, options, error, match", [
    ("t2v", "", None, {}, ValueError, "prompt is empty"),
    ("t2v", "  \n", None, {}, ValueError, "prompt is empty"),
    ("t2v", PROMPT, None, {"num_frames": 80}, ValueError, "4k\\+1"),
    ("t2v", PROMPT, None, {"num_frames": 0}, ValueError, "4k\\+1"),
    ("t2v", PROMPT, None, {"resolution": "1080p"}, ValueError, "unsupported resolution"),
    ("t2v", PROMPT, None, {"aspect_ratio": "21:9"}, ValueError, "unsupported aspect ratio"),
    ("t2v", PROMPT, None, {"num_steps": 5}, ValueError, "num_steps must be 1, 2, 3 or 4"),
    ("t2v", PROMPT, None, {"sigma_max": 0.05}, ValueError, "sigma_max"),
    ("t2v", PROMPT, None, {"num_samples": 0}, ValueError, "num_samples"),
    ("t2v", PROMPT, None, {"seed": -1}, ValueError, "seed"),
    ("t2v", PROMPT, None, {"mode": "ode"}, ValueError, "an I2V option"),
    ("t2v", PROMPT, "photo.png", {}, ValueError, "takes no image"),
    ("i2v", PROMPT, None, {}, ValueError, "needs an image"),
    ("i2v", PROMPT, "missing.png", {}, FileNotFoundError, "no such image file"),
    ("i2v", PROMPT, "not_an_image.png", {}, ValueError, "cannot be read as an image"),
    ("i2v", PROMPT, "photo.png", {"mode": "euler"}, ValueError, "mode must be"),
])
def test_plan_refuses_bad_input(tmp_path, image_file, kind, prompt, image, options, error, match):
    (tmp_path / "not_an_image.png").write_text("plain text")
    paths = {"photo.png": image_file, "missing.png": tmp_path / "missing.png",
             "not_an_image.png": tmp_path / "not_an_image.png", None: None}
    with pytest.raises(error, match=match):
        plan(kind, prompt, paths[image], **options)


def test_plan_resolves_sizes_and_defaults(image_file):
    t2v = plan("t2v", PROMPT)
    assert (t2v.height, t2v.width, t2v.num_frames, t2v.schedule.sigma_max) == (480, 832, 81, 80.0)
    i2v = plan("i2v", PROMPT, image_file)
    assert (i2v.height, i2v.width, i2v.schedule.sigma_max, i2v.schedule.mode) == (720, 1280, 200.0, "sde")
    adaptive = plan("i2v", PROMPT, image_file, resolution="480p", adaptive_resolution=True, mode="ode")
    assert (adaptive.height, adaptive.width, adaptive.schedule.mode) == (544, 736, "ode")
    assert adaptive.latent_shape == (1, 16, 21, 68, 92)


def test_attention_options():
    assert pipeline_module.attention_spec("sla", 0.15) == turbojax.AttentionSpec("sla", topk=0.15)
    assert pipeline_module.attention_spec("sagesla", 0.15) == turbojax.AttentionSpec("sagesla", topk=0.15)
    assert pipeline_module.attention_spec("dense").kind == "dense"
    with pytest.raises(ValueError, match="unknown attention"):
        pipeline_module.attention_spec("flash")


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2v():
    return T2VPipeline.tiny(0, verbose=False)


@pytest.fixture(scope="module")
def t2v_video(t2v):
    return t2v(PROMPT, num_frames=9, num_samples=2, seed=3)


def test_t2v_end_to_end_to_an_mp4(t2v_video, tmp_path):
    video = t2v_video
    assert video.frames.shape == (2, 9, 48, 80, 3) and video.frames.dtype == np.uint8
    assert video.latents.shape == (2, 16, 3, 6, 10) and np.isfinite(video.latents).all()
    assert video.experts == ("high",) * 4
    assert set(video.timings) == {"text_encode", "diffusion", "vae_decode"}
    path = video.save(tmp_path / "fox.mp4")
    assert set(video.timings) == {"text_encode", "diffusion", "vae_decode", "write"}
    frames, meta = read_mp4(path)
    assert frames.shape == (9, 48, 160, 3)  # two samples side by side
    assert meta["fps"] == 16 and meta["codec"] == "h264"
    # H.264 at crf 25 is lossy (and random weights make noisy frames), but the decoded frames are far closer to
    # the generated ones, sample 0 on the left, than to the samples swapped.
    def err(want):
        return np.abs(frames.astype(np.int16) - want.astype(np.int16)).mean()

    swapped = np.concatenate([video.frames[1], video.frames[0]], axis=2)
    assert err(video.tiled()) < 0.5 * err(swapped)
    assert not list(tmp_path.glob(".*partial*"))


def test_same_seed_same_frames_other_seed_other_frames(t2v, t2v_video):
    again = t2v(PROMPT, num_frames=9, num_samples=2, seed=3)
    np.testing.assert_array_equal(again.frames, t2v_video.frames)
    other = t2v(PROMPT, num_frames=9, num_samples=2, seed=4)
    assert np.mean(other.frames != t2v_video.frames) > 0.5
    assert not np.array_equal(t2v_video.frames[0], t2v_video.frames[1])  # the samples differ


def _module(pipe, name):
    return nnx.merge(pipe.experts.graphdefs[name], pipe.experts.device_state(name))


def test_text_encoder_is_freed_after_encoding_unless_kept():
    loads = []

    def counting_loader(inner):
        def load():
            loads.append(1)
            return inner()
        return load

    pipe = T2VPipeline.tiny(0, verbose=False)
    pipe.text._load = counting_loader(pipe.text._load)
    pipe.text.encode(PROMPT)
    assert pipe.text.encoder is None and pipe.text.nbytes > 0
    pipe.text.encode(PROMPT)  # the last prompt's embedding is kept
    assert len(loads) == 1
    pipe.text.encode("Another prompt.")
    assert len(loads) == 2 and pipe.text.encoder is None

    kept = T2VPipeline.tiny(0, keep_text_encoder=True, verbose=False)
    kept.text.encode(PROMPT)
    assert kept.text.encoder is not None and kept.text.encoder.loaded


def test_both_fit_predicate():
    gb = 10**9
    assert both_fit([29 * gb, 29 * gb], gb, 8 * gb, None)  # no known limit (CPU)
    assert both_fit([29 * gb, 29 * gb], gb, 8 * gb, 80 * gb)  # 67 GB <= 72 GB
    assert not both_fit([29 * gb, 29 * gb], 12 * gb, 8 * gb, 80 * gb)  # 78 GB with a kept text encoder
    assert not both_fit([29 * gb, 29 * gb], gb, 8 * gb, 60 * gb)
    assert both_fit([10], 0, 0, int(10 / USABLE) + 1)


@pytest.fixture(scope="module")
def i2v_offloaded(image_file):
    """The tiny I2V pipeline on a device the memory plan believes too small for both experts."""
    pipe = I2VPipeline.tiny(0, verbose=False)
    original = pipeline_module.device_memory_limit
    pipeline_module.device_memory_limit = lambda device: 1
    try:
        video = pipe(PROMPT, image_file, num_frames=5, adaptive_resolution=True, seed=1, num_samples=2)
    finally:
        pipeline_module.device_memory_limit = original
    return pipe, video


def test_i2v_end_to_end_switches_experts_high_high_low_low(i2v_offloaded, tmp_path):
    pipe, video = i2v_offloaded
    # 1000x750 image at tiny 16:9 (80x48, A = 3840): h = round(53.7/16)*16 = 48, w = round(71.6/16)*16 = 64.
    assert video.frames.shape == (2, 5, 48, 64, 3)
    assert video.experts == ("high", "high", "low", "low")  # sigma_max 200, 4 steps, boundary 0.9
    assert set(video.timings) == {"text_encode", "image_encode", "diffusion", "vae_decode"}
    # Only the running expert was on the device: low freed before the high steps, high before low came up, and low
    # after the steps (the VAE decode runs without an expert).
    assert pipe.experts.transfers == [("low", "host"), ("high", "host"), ("low", "device"), ("low", "host")]
    assert pipe.experts.on_device() == []
    path = video.save(tmp_path / "i2v.mp4")
    assert read_mp4(path)[0].shape == (5, 48, 128, 3)


def test_i2v_offload_changes_nothing_but_placement(i2v_offloaded, image_file):
    _, video = i2v_offloaded
    resident = I2VPipeline.tiny(0, offload=False, verbose=False)
    same = resident(PROMPT, image_file, num_frames=5, adaptive_resolution=True, seed=1, num_samples=2)
    np.testing.assert_array_equal(same.frames, video.frames)
    assert resident.experts.transfers == [] and resident.experts.on_device() == ["high", "low"]


def test_t2v_offload_puts_the_dit_on_the_device_for_the_steps_only():
    pipe = T2VPipeline.tiny(0, offload=True, verbose=False)
    assert pipe.experts.on_device() == [] and pipe.experts.transfers == [("high", "host")]
    video = pipe(PROMPT, num_frames=5, seed=3)
    again = pipe(PROMPT, num_frames=5, seed=3)
    assert pipe.experts.transfers == [("high", "host")] + [("high", "device"), ("high", "host")] * 2
    assert pipe.experts.on_device() == []
    resident = T2VPipeline.tiny(0, verbose=False)
    np.testing.assert_array_equal(resident(PROMPT, num_frames=5, seed=3).frames, video.frames)
    np.testing.assert_array_equal(again.frames, video.frames)
    assert resident.experts.transfers == [] and resident.experts.on_device() == ["high"]


def test_i2v_matches_the_one_program_sampler_with_the_spec_condition(i2v_offloaded, image_file):
    pipe, video = i2v_offloaded
    # The I2V condition built from acceleration.md 2.7: mask (1 on latent frame 0) then the normalised bf16 latent
    # of the image followed by zero frames.
    image = turbojax.load_image(image_file, 48, 64)
    mu = pipe.vae.encode(turbojax.image_to_video(image, 5))
    lat = turbojax.normalize_latents(mu).astype(jnp.bfloat16)
    mask = np.zeros((1, 4, *lat.shape[2:]), np.float32)
    mask[:, :, 0] = 1
    cond = jnp.repeat(jnp.concatenate([jnp.asarray(mask, jnp.bfloat16), lat], axis=1), 2, axis=0)
    context = jnp.repeat(pipe.text.encode(PROMPT), 2, axis=0)
    for name in ("high", "low"):
        pipe.experts.activate(name, keep_others=True)
    sampler = turbojax.RCMSampler(_module(pipe, "high"), _module(pipe, "low"),
                                  schedule=turbojax.RCMSchedule(num_steps=4, sigma_max=200))
    ref = sampler(context, cond, seed=1, latent_shape=(2, 16, 2, 6, 8))
    np.testing.assert_allclose(video.latents, np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_samples_are_tiled_side_by_side(i2v_offloaded):
    _, video = i2v_offloaded
    assert video.tiled().shape == (5, 48, 128, 3)
    np.testing.assert_array_equal(video.tiled()[:, :, :64], video.frames[0])
    np.testing.assert_array_equal(video.tiled()[:, :, 64:], video.frames[1])
    assert not np.array_equal(video.frames[0], video.frames[1])  # one condition, two noises


def test_pipeline_refuses_mismatched_parts():
    from turbojax.pipelines import tiny

    with pytest.raises(ValueError, match="different models"):
        I2VPipeline({"high": tiny.tiny_dit(0, i2v=True), "low": tiny.tiny_dit(0)}, tiny.tiny_vae(0),
                    pipeline_module.TextStage(lambda: tiny.tiny_text_encoder(0), keep=False))
    z4 = nnx.eval_shape(lambda: turbojax.WanVAE(turbojax.VAEConfig(base_dim=8, z_dim=4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="latent channels"):
        T2VPipeline({"high": tiny.tiny_dit(0)}, tiny.random_init(z4, 0, tiny.kernel_fan_in),
                    pipeline_module.TextStage(lambda: tiny.tiny_text_encoder(0), keep=False))


def test_memory_estimate_adds_up():
    from turbojax.pipelines import memory

    r = memory.estimate(memory.Preset("tiny", "tiny", "tiny", experts=2), num_frames=5)
    b, w, peak = r["bytes"], r["working"], r["peak"]
    assert abs(b["text"] - 11.362e9) < 1e6 and abs(b["vae"] - 0.2538e9) < 1e6  # umT5-XXL and the Wan2.1 VAE, bf16
    assert b["dit"] == 2 * b["expert"] and min(w["text_encode"], w["diffusion"], w["vae_decode"]) > 0
    resident = b["dit"] + b["vae"]
    assert peak["generate"] == max(resident + b["text"] + w["text_encode"], resident + w["diffusion"],
                                   resident + w["vae_decode"])
    assert peak["serve"] >= peak["generate"]
    assert peak["generate, offload"] == max(b["vae"] + b["text"] + w["text_encode"],
                                            b["vae"] + b["expert"] + w["diffusion"], b["vae"] + w["vae_decode"],
                                            b["vae"] + w["image_encode"])
