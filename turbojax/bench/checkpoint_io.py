"""Conversion and loading at real size: synthesise a stock-Wan checkpoint of a preset, convert it, load it, run it.

    python -m turbojax.bench.checkpoint_io --preset wan2.1-t2v-1.3b --workdir /tmp/ckio

Reports the conversion's wall time and peak anonymous memory (RssAnon, sampled; memory-mapped file pages are not
counted because the kernel can drop them), the load_dit time, and one forward at 480p of the loaded model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def _rss_anon_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


class PeakAnon:
    """Samples RssAnon every 20 ms in a thread; .peak is the maximum seen (MiB)."""

    def __enter__(self):
        self.peak, self._stop = _rss_anon_mib(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_anon_mib())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def write_stock_wan_safetensors(path: Path, cfg) -> int:
    """Writes random bf16 tensors with every key and shape of a stock Wan checkpoint, one tensor at a time."""
    from convert.layouts import expected_shapes

    shapes = expected_shapes(cfg.replace(sla_proj=False), quantized=False)
    shapes["patch_embedding.weight"] = (cfg.dim, cfg.in_dim, *cfg.patch_size)
    header, offset = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k, s in shapes.items():
            scale = 1.0 if ("norm" in k and k.endswith("weight")) else 0.02
            f.write((rng.standard_normal(s, np.float32) * scale).astype(ml_dtypes.bfloat16).tobytes())
    return offset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--workdir", default="/tmp/turbojax-ckio")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import turbojax
    from convert.cli import convert
    from turbojax.bench.dit_forward import latent_shape

    cfg = turbojax.get_preset(args.preset)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "diffusion_pytorch_model.safetensors"
    nbytes = write_stock_wan_safetensors(src, cfg)

    base = _rss_anon_mib()
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        convert([str(src)], str(work / "converted"), progress=False)
        convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dit = turbojax.load_dit(work / "converted", progress=False)
    jax.block_until_ready(jax.tree.leaves(dit))
    load_s = time.perf_counter() - t0
    shape = latent_shape(dit.cfg, "480p", 81)
    x = jnp.full(shape, 0.5, jnp.bfloat16)
    out = nnx.jit(lambda m, *a: m(*a))(dit, x, jnp.array([988.0]), jnp.zeros((1, cfg.text_len, cfg.text_dim)))
    result = {
        "preset": args.preset, "checkpoint_gib": nbytes / 2**30, "convert_s": convert_s,
        "convert_peak_anon_gib": (mem.peak - base) / 1024, "load_s": load_s,
        "forward_finite": bool(np.isfinite(np.asarray(out)).all()), "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
