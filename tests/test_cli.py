"""`turbojax generate` end to end on CPU, and the W8A8 dequantisation used at load."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from turbojax.checkpoint import dequantize
from turbojax.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "dit"


def test_generate_tiny_smoke(tmp_path, capsys):
    out = tmp_path / "lat.npy"
    assert main(["generate", "--out", str(out), "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "smoke test" in text and "988, 932, 852, 608" in text
    lat = np.load(out)
    assert lat.shape == (1, 16, 3, 4, 6) and lat.dtype == np.float32 and np.isfinite(lat).all()
    assert main(["generate", "--out", str(tmp_path / "again.npy"), "--seed", "1"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), lat)
    assert not list(tmp_path.glob(".*partial*"))


def test_generate_from_converted_checkpoint(tmp_path):
    from convert.cli import main as convert_main

    ckpt = tmp_path / "ckpt"
    assert convert_main([str(FIXTURES / "turbo_t2v" / "turbo_t2v.pth"), "--out", str(ckpt), "--quiet"]) == 0
    ctx = tmp_path / "ctx.npy"
    np.save(ctx, np.load(FIXTURES / "turbo_t2v" / "io.npz")["context"][:1])
    out = tmp_path / "lat.npy"
    rc = main(["generate", "--checkpoint", str(ckpt), "--context", str(ctx), "--frames", "5", "--height", "32",
               "--width", "48", "--steps", "2", "--out", str(out)])
    assert rc == 0
    assert np.load(out).shape == (1, 16, 2, 4, 6)


@pytest.mark.parametrize("args, match", [
    (["--frames", "80"], "4k\\+1"),
    (["--height", "100"], "multiples of 16"),
    ([], "--context"),
])
def test_generate_bad_input(tmp_path, args, match):
    from convert.cli import main as convert_main

    ckpt = tmp_path / "ckpt"
    assert convert_main([str(FIXTURES / "turbo_t2v" / "turbo_t2v.pth"), "--out", str(ckpt), "--quiet"]) == 0
    ctx = tmp_path / "ctx.npy"
    np.save(ctx, np.zeros((1, 512, 32), np.float32))
    extra = [] if args == [] else ["--context", str(ctx)]
    with pytest.raises(SystemExit, match=match):
        main(["generate", "--checkpoint", str(ckpt), *extra, *args, "--out", str(tmp_path / "x.npy")])
    assert not (tmp_path / "x.npy").exists()


def test_bad_steps_is_one_clear_error(capsys):
    assert main(["generate", "--steps", "6"]) == 2
    assert "num_steps must be 1, 2, 3 or 4" in capsys.readouterr().err


def test_console_script_entry_points_import():
    out = subprocess.run([sys.executable, "-m", "turbojax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_dequantize_uses_each_128x128_tile_scale():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, size=(300, 260), dtype=np.int8)
    scale = rng.uniform(0.01, 1.0, size=(3, 3)).astype(np.float32)
    out = dequantize(q, scale)
    for i in range(300):
        for j in (0, 127, 128, 255, 256, 259):
            assert out[i, j] == np.float32(q[i, j]) * scale[i // 128, j // 128]


def test_generate_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    ctx = tmp_path / "ctx.npy"
    np.save(ctx, np.zeros((1, 512, 32), np.float32))
    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--context", str(ctx), "--out",
               str(tmp_path / "x.npy")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a converted turbojax checkpoint" in err[0]


def test_generate_i2v_with_cond_and_bad_cond(tmp_path, capsys):
    from convert.cli import main as convert_main

    ckpt = tmp_path / "i2v"
    assert convert_main([str(FIXTURES / "turbo_i2v" / "turbo_i2v.pth"), "--out", str(ckpt), "--quiet"]) == 0
    io = np.load(FIXTURES / "turbo_i2v" / "io.npz")
    ctx, cond = tmp_path / "ctx.npy", tmp_path / "cond.npy"
    np.save(ctx, io["context"][:1])
    np.save(cond, io["cond"][:1])
    args = ["generate", "--checkpoint", str(ckpt), "--context", str(ctx), "--frames", "9", "--height", "32",
            "--width", "48", "--steps", "2", "--sigma-max", "200"]
    with pytest.raises(SystemExit, match="--cond"):
        main([*args, "--out", str(tmp_path / "a.npy")])
    assert main([*args, "--cond", str(cond), "--out", str(tmp_path / "b.npy")]) == 0
    assert np.load(tmp_path / "b.npy").shape == (1, 16, 3, 4, 6)
    np.save(cond, io["cond"][:1, :, :2])  # 2 latent frames where the latents have 3
    capsys.readouterr()
    assert main([*args, "--cond", str(cond), "--out", str(tmp_path / "c.npy")]) == 2
    assert "cond must be" in capsys.readouterr().err
    assert not (tmp_path / "c.npy").exists()
