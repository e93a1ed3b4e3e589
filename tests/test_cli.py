"""`turbojax generate` and `turbojax serve` end to end on CPU: the tiny smoke test, converted checkpoints, one clear
error per bad input with no mp4 left behind; and the W8A8 dequantisation used at load."""

import dataclasses
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import imageio
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from turbojax.checkpoint import VAE_FORMAT, dequantize, write_checkpoint
from turbojax.cli import main
from turbojax.pipelines import tiny

FIXTURES = Path(__file__).parent / "fixtures"


def frames_of(path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # imageio's reader starts ffmpeg (fork + exec)
        with imageio.get_reader(path, "ffmpeg") as reader:
            return np.stack(list(reader.iter_data()))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_tiny_smoke_test(tmp_path, capsys):
    out = tmp_path / "smoke.mp4"
    assert main(["generate", "--out", str(out), "--frames", "5"]) == 0
    text = capsys.readouterr().out
    assert "smoke test" in text and "random weights" in text
    assert "text encode" in text and "diffusion" in text and "VAE decode" in text and "write" in text
    assert frames_of(out).shape == (5, 48, 80, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["smoke.mp4"]


def test_generate_tiny_i2v_smoke_test(tmp_path, image_file, capsys):
    out = tmp_path / "i2v"  # no suffix: .mp4 is added
    assert main(["generate", "--image", str(image_file), "--out", str(out), "--frames", "5", "--steps", "3",
                 "--adaptive-resolution"]) == 0
    text = capsys.readouterr().out
    assert "smoke test" in text and "experts per step: high, high, low" in text
    # 120x90 image at tiny 16:9 (A = 3840, ar = 0.75) -> 48 x 64.
    assert frames_of(tmp_path / "i2v.mp4").shape == (5, 48, 64, 3)


def test_sla_blocks_reach_the_dit(tmp_path, monkeypatch):
    """--attention sagesla --sla-topk 0.15 --sla-blocks 64x128 (TurboDiffusion's SageSLA blocks on an H100) builds
    the DiT with that AttentionSpec, and the smoke test runs with it."""
    from turbojax.models.attention import AttentionSpec

    specs, tiny_dit = [], tiny.tiny_dit
    monkeypatch.setattr(tiny, "tiny_dit", lambda seed, **kw: specs.append(kw["attention"]) or tiny_dit(seed, **kw))
    out = tmp_path / "sage.mp4"
    assert main(["generate", "--out", str(out), "--frames", "5", "--attention", "sagesla", "--sla-topk", "0.15",
                 "--sla-blocks", "64x128"]) == 0
    assert specs == [AttentionSpec("sagesla", topk=0.15, block_q=64, block_k=128)]
    assert frames_of(out).shape == (5, 48, 80, 3)


@pytest.mark.parametrize("args, match", [
    (["--prompt", ""], "prompt is empty"),
    (["--frames", "80"], "4k\\+1"),
    (["--resolution", "1080p"], "unsupported resolution"),
    (["--aspect-ratio", "2:1"], "unsupported aspect ratio"),
    (["--steps", "6"], "num_steps must be 1, 2, 3 or 4"),
    (["--samples", "0"], "num_samples"),
    (["--ode"], "--ode: image-to-video option"),
    (["--ode", "--adaptive-resolution"], "--ode, --adaptive-resolution: image-to-video option"),
    (["--image", "{tmp}/missing.png"], "no such image file"),
    (["--image", "{tmp}/text.png"], "cannot be read as an image"),
    (["--out", "{tmp}/x.avi"], "ending in .mp4"),
    (["--dit", "{tmp}/dit"], "missing checkpoint parts: --text-encoder, --vae"),
    (["--text-encoder", "{tmp}/umt5"], "missing checkpoint parts: --dit, --vae"),
    (["--dit", "{tmp}/nope", "--text-encoder", "{tmp}/umt5", "--vae", "{tmp}/vae"], "--dit: .*not a converted"),
    (["--linears", "w8a8"], "--linears applies to converted checkpoints"),
])
def test_generate_bad_input_is_one_clear_error(tmp_path, capsys, args, match):
    (tmp_path / "text.png").write_text("not an image")
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "x.mp4")]
    assert main(["generate", *args, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("turbojax generate: error: ")
    assert re.search(match, err[0]), err[0]
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*"))


# ---------------------------------------------------------------------------------------------------------------
# Converted checkpoints (the test fixtures: a tiny DiT and umT5; a random z_dim 16 VAE written here)
# ---------------------------------------------------------------------------------------------------------------


def write_vae_folder(path: Path) -> Path:
    """The tiny preset's random VAE as a converted folder (the VAE fixture has z_dim 4; the DiT needs 16)."""
    vae = tiny.tiny_vae(0)

    def saved(tree):  # nnx.List indices as strings, values fp32, as turbojax-convert writes them
        return {str(k): saved(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float32)

    meta = {"component": "vae", "model": dataclasses.asdict(vae.cfg), "source": {"layout": "test"}}
    return write_checkpoint(path, meta, saved(nnx.to_pure_dict(nnx.state(vae))), [], num_blocks=0, progress=False,
                            fmt=VAE_FORMAT)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from convert.cli import main as convert_main

    root = tmp_path_factory.mktemp("ckpt")
    for src, name in ((FIXTURES / "dit" / "turbo_t2v" / "turbo_t2v.pth", "t2v"),
                      (FIXTURES / "dit" / "turbo_i2v" / "turbo_i2v.pth", "i2v"),
                      (FIXTURES / "dit" / "turbo_t2v_quant" / "turbo_t2v_quant.pth", "t2v_quant"),
                      (FIXTURES / "umt5" / "wan" / "models_t5_umt5-xxl-enc-bf16.pth", "umt5"),
                      (FIXTURES / "vae" / "wan" / "Wan2.1_VAE.pth", "vae_z4")):
        assert convert_main([str(src), "--out", str(root / name), "--quiet"]) == 0
    write_vae_folder(root / "vae")
    return root


def test_generate_t2v_from_converted_checkpoints(ckpt, tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    rc = main(["generate", "--dit", str(ckpt / "t2v"), "--text-encoder", str(ckpt / "umt5"), "--vae",
               str(ckpt / "vae"), "--prompt", "A cat walks along a neon-lit street at night.", "--resolution",
               "tiny", "--frames", "5", "--steps", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "smoke test" not in text and "wrote" in text
    assert frames_of(out).shape == (5, 48, 80, 3)


def test_generate_from_a_quant_checkpoint_runs_w8a8(ckpt, tmp_path):
    from turbojax.pipelines import T2VPipeline

    def linears(**kw):
        pipe = T2VPipeline.load(ckpt / "t2v_quant", ckpt / "umt5", ckpt / "vae", progress=False, **kw)
        return nnx.merge(pipe.experts.graphdefs["high"], pipe.experts.device_state("high")).linears

    assert linears() == "w8a8" and linears(linears="float") == "float"  # the folder decides unless told
    out = tmp_path / "quant.mp4"
    rc = main(["generate", "--dit", str(ckpt / "t2v_quant"), "--text-encoder", str(ckpt / "umt5"), "--vae",
               str(ckpt / "vae"), "--prompt", "A cat.", "--resolution", "tiny", "--frames", "5", "--steps", "2",
               "--offload", "--out", str(out)])  # the 24 GB-card recipe: -quant weights, offloaded between steps
    assert rc == 0 and frames_of(out).shape == (5, 48, 80, 3)


def test_generate_i2v_from_converted_experts(ckpt, tmp_path, image_file):
    out = tmp_path / "i2v.mp4"
    rc = main(["generate", "--dit", str(ckpt / "i2v"), "--low-dit", str(ckpt / "i2v"), "--text-encoder",
               str(ckpt / "umt5"), "--vae", str(ckpt / "vae"), "--prompt", "The dog turns its head.", "--image",
               str(image_file), "--resolution", "tiny", "--adaptive-resolution", "--frames", "5", "--ode",
               "--offload", "--out", str(out)])
    assert rc == 0
    assert frames_of(out).shape == (5, 48, 64, 3)


@pytest.mark.parametrize("parts, extra, match", [
    ({"--dit": "i2v", "--text-encoder": "umt5", "--vae": "vae"}, ["--image", "{img}"],
     "missing checkpoint parts: --low-dit"),
    ({"--dit": "t2v", "--text-encoder": "umt5", "--vae": "vae"}, ["--image", "{img}"], "takes no image"),
    ({"--dit": "i2v", "--low-dit": "i2v", "--text-encoder": "umt5", "--vae": "vae"}, [], "needs an image"),
    ({"--dit": "t2v", "--text-encoder": "umt5", "--vae": "vae_z4"}, [], "--vae: the VAE has 4 latent channels"),
    ({"--dit": "t2v", "--text-encoder": "vae", "--vae": "vae"}, [], "--text-encoder: .*turbojax-umt5/1"),
    ({"--dit": "umt5", "--text-encoder": "umt5", "--vae": "vae"}, [], "--dit: .*turbojax-dit/1"),
    ({"--dit": "t2v", "--text-encoder": "umt5", "--vae": "vae"}, ["--prompt", "x", "--low-dit", "{ckpt}/t2v"],
     "--low-dit is the second expert"),
    ({"--dit": "t2v", "--text-encoder": "umt5", "--vae": "vae"}, [], "--prompt is required"),
])
def test_generate_bad_checkpoints_are_one_clear_error(ckpt, tmp_path, image_file, capsys, parts, extra, match):
    args = [x for flag, name in parts.items() for x in (flag, str(ckpt / name))]
    extra = [a.format(img=image_file, ckpt=ckpt) for a in extra]
    prompt = [] if "--prompt" in extra or match == "--prompt is required" else ["--prompt", "A dog."]
    assert main(["generate", *args, *prompt, *extra, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------------------


def test_serve_session_from_stdin(tmp_path, capsys, monkeypatch):
    out = tmp_path / "serve-{n}.mp4"
    session = "\n".join([
        "/help",
        "/set num_frames 5",
        "A paper boat drifts down a rain-soaked gutter.",
        "/set num_frames 80",  # refused: the setting stays 5
        "/set num_steps two",
        "/set mode ode",  # an I2V setting in a T2V session
        "/frobnicate",
        "/set seed 7",
        "/show",
        "The same boat, another seed.",
        "/reset",
        "/show",
        "/quit",
        "never generated",
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(session))
    assert main(["serve", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "/set KEY VALUE" in captured.out and "num_frames = 5" in captured.out and "seed = 7" in captured.out
    assert captured.out.count("wrote ") == 2
    errors = captured.err.strip().splitlines()
    assert [e.split(":")[0] for e in errors] == ["error"] * 4, errors
    assert "4k+1" in errors[0] and "takes an integer" in errors[1] and "unknown setting 'mode'" in errors[2]
    assert "unknown command /frobnicate" in errors[3]
    assert captured.out.rstrip().endswith("out = " + str(out))  # /reset, /show: back to the launch settings
    assert "num_frames = 81" in captured.out.split("settings reset")[1]
    a, b = frames_of(tmp_path / "serve-1.mp4"), frames_of(tmp_path / "serve-2.mp4")
    assert a.shape == b.shape == (5, 48, 80, 3) and not np.array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve-1.mp4", "serve-2.mp4"]


def test_console_script_entry_points_import():
    out = subprocess.run([sys.executable, "-m", "turbojax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "serve" in out.stdout


def test_dequantize_uses_each_128x128_tile_scale():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, size=(300, 260), dtype=np.int8)
    scale = rng.uniform(0.01, 1.0, size=(3, 3)).astype(np.float32)
    out = dequantize(q, scale)
    for i in range(300):
        for j in (0, 127, 128, 255, 256, 259):
            assert out[i, j] == np.float32(q[i, j]) * scale[i // 128, j // 128]
