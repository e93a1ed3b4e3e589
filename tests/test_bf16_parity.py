"""bf16 parity: the production dtype flow against independent bf16 torch oracles.

The fp32 oracle cannot check the bf16 path: a bf16 forward lands ~5e-3 from it whatever its dtype flow, and so do
the wrong flows (fp32 residual in a TurboDiffusion model, stock q/k RMSNorm rounding, ...). The oracles here are
bf16 transcriptions of wan-model.md 2 / 4.1 and acceleration.md 6 in make_dit_fixtures.py (`bf16_forward`):

  turbo_t2v/io.npz  velocity_bf16_turbo   TurboDiffusion's network: bf16 residual, fused norms (one rounding),
                                          x + y * bf16(gate)
  wan_t2v/io.npz    velocity_bf16_stock   stock Wan under bf16 autocast: fp32 residual, WanRMSNorm rounding
                                          (bf16(norm) * w, fp32 through RoPE), float64 RoPE

The tiny bf16 network is chaotic at the ulp level: one flipped bf16 rounding in the residual stream moves its output
by up to 3e-3 (measured by injecting one-ulp flips into the oracle), as much as a systematic dtype mistake. So
the only check that tells a right flow from a wrong one is that every bf16 rounding is reproduced. It is: with the
attention pinned (below), the model matches its oracle to 3e-7, fp32 noise from the time embedding and the fp32
head. TOL = 1e-5 leaves 30x for fp32 noise. Every wrong flow lands at least 2e-3 away, 200x TOL; the test requires
more than WRONG = 1e-3 (100x TOL).

Attention is pinned on the JAX side to the single-rounding form the oracle uses (q k^T, softmax and P V in fp32 on
bf16 q, k, v; one rounding). `dense_xla` rounds the normalised P to bf16 before P V, and flash kernels round the
unnormalised P; both are valid readings of "bf16 inputs, fp32 accumulation". dense_xla differs from the oracle by
1 ulp in 20-30% of the attention outputs, which would hide everything else. The attention kernels have their own
tests.

If a JAX/XLA upgrade changes fp32 summation order enough to flip one rounding, these tests fail without a dtype-flow
bug. To find the op, compare intermediates: `bf16_forward(..., trace={})` records them by name.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
import turbojax.checkpoint
from convert.cli import convert
from pallas_kernels.norms import reference as norms_reference
from turbojax.models import layers, wan_dit

FIXTURES = Path(__file__).parent / "fixtures" / "dit"
SOURCES = {"turbo": "turbo_t2v/turbo_t2v.pth", "wan": "wan_t2v/diffusion_pytorch_model.safetensors"}
ORACLE = {"turbo": "velocity_bf16_turbo", "wan": "velocity_bf16_stock"}
TOL = 1e-5  # max|a - b| / max|b|
WRONG = 1e-3  # every wrong dtype flow must land further than this from the oracle
f32, bf16 = jnp.float32, jnp.bfloat16


def rel_err(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {n: convert([str(FIXTURES / s)], str(root / n), progress=False) for n, s in SOURCES.items()}


@pytest.fixture(scope="module")
def io():
    return {n: dict(np.load(FIXTURES / s.split("/")[0] / "io.npz")) for n, s in SOURCES.items()}


def _single_rounding_attention(q, k, v, *_, **__):
    """softmax(q k^T / sqrt(d)) v with fp32 logits, softmax and P V on bf16 q, k, v; one rounding to q's dtype."""
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    o = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1), v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return o.astype(q.dtype)


@pytest.fixture(autouse=True)
def pinned_attention(monkeypatch):
    monkeypatch.setattr(wan_dit, "dense", _single_rounding_attention)
    monkeypatch.setattr(wan_dit, "self_attention", _single_rounding_attention)


@pytest.fixture(autouse=True)
def on_cpu():
    """These are checks of the dtype flow, run on XLA:CPU whatever the default backend. On an H100 every op of the
    turbo flow also reproduces the oracle bit for bit, run op by op with the oracle's inputs, except one element of
    one FFN output (1 of 1728: GPU fp32 arithmetic lands on the other side of a bf16 rounding). One flipped rounding
    can move this chaotic net's output by 3e-3, so a whole-forward comparison there cannot tell right from wrong."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _load(path, **kw):
    return turbojax.load_dit(path, dtype=bf16, progress=False, **kw)


def _forward(dit, io_, mode: str) -> np.ndarray:
    """mode: "eager" (op by op: each op rounds as written), "jit" (the production path), "jit_exact" (jit with
    XLA's excess precision off, so bf16 values are rounded wherever the program rounds them)."""
    args = (jnp.asarray(io_["latents"]), jnp.asarray(io_["timestep"]), jnp.asarray(io_["context"]))
    if mode == "eager":
        with jax.disable_jit():
            out = dit(*args)
    else:
        opts = {"xla_allow_excess_precision": False} if mode == "jit_exact" else None
        out = jax.jit(dit.__call__, compiler_options=opts)(*args)
    out = np.asarray(out)
    assert out.dtype == np.float32
    return out


# ---- TurboDiffusion family -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "jit_exact"])
def test_turbo_bf16_dtype_flow_matches_oracle(converted, io, mode):
    dit = _load(converted["turbo"])
    assert dit.cfg.family == "turbodiffusion" and dit.residual_dtype == bf16
    out = _forward(dit, io["turbo"], mode)
    assert rel_err(out, io["turbo"][ORACLE["turbo"]]) <= TOL
    assert rel_err(out, io["turbo"]["velocity"]) > WRONG  # the fp32 oracle is far: this is a bf16-level check


# Under jit, XLA may keep fp32 where the program rounds to bf16 (xla_allow_excess_precision, on by default); the
# model pins the roundings that matter (the bf16 residual read by every norm, layers.exact_f32), so the production
# path matches too.
def test_turbo_bf16_jit_matches_oracle(converted, io):
    out = _forward(_load(converted["turbo"]), io["turbo"], "jit")
    assert rel_err(out, io["turbo"][ORACLE["turbo"]]) <= TOL


def _rms_stock_rounding(x, weight, eps, out_dtype, round_before_weight=None):
    """WanRMSNorm's rounding (bf16 before the weight multiply) forced into every q/k norm."""
    return _orig_rms_norm(x, weight, eps, out_dtype, round_before_weight=bf16)


def _rms_fused_rounding(x, weight, eps, out_dtype, round_before_weight=None):
    """FastRMSNorm's single rounding (to bf16) forced into every q/k norm."""
    return _orig_rms_norm(x, weight, eps, bf16, round_before_weight=None)


def _rms_bf16_out(x, weight, eps, out_dtype, round_before_weight=None):
    """The q/k norm result rounded to bf16 before RoPE (turbojax's stock path before it kept it fp32)."""
    return _orig_rms_norm(x, weight, eps, bf16, round_before_weight=round_before_weight)


_orig_rms_norm = layers.rms_norm


def _family(name):
    orig = turbojax.checkpoint.config_from_meta
    return lambda meta: dataclasses.replace(orig(meta), family=name)


# name -> (load_dit kwargs, [(module, attribute, replacement)])
TURBO_WRONG = {
    "fp32 residual": ({"residual_dtype": f32}, []),
    "stock q/k RMSNorm rounding": ({}, [(layers, "rms_norm", _rms_stock_rounding),
                                        (norms_reference, "rms_norm", _rms_stock_rounding)]),
    "stock family (fp32 residual + stock norms)": ({}, [(turbojax.checkpoint, "config_from_meta", _family("wan"))]),
}


@pytest.mark.parametrize("variant", list(TURBO_WRONG))
def test_turbo_wrong_dtype_flows_are_rejected(converted, io, monkeypatch, variant):
    kw, patches = TURBO_WRONG[variant]
    for mod, attr, new in patches:
        monkeypatch.setattr(mod, attr, new)
    out = _forward(_load(converted["turbo"], **kw), io["turbo"], "eager")
    assert rel_err(out, io["turbo"][ORACLE["turbo"]]) > WRONG


# ---- stock Wan family ----------------------------------------------------------------------------------------

def test_stock_bf16_dtype_flow_matches_oracle(converted, io):
    """Under jit (the production path). Stock Wan rounds block 0's norm1 output to bf16 (its residual is still the
    bf16 patch embedding there), which makes this comparison hinge on the fp32 LayerNorm landing on the same side of
    that rounding: XLA's fused jit LayerNorm does, op-by-op evaluation (a different summation order) flips a few
    elements, and one flip moves this tiny net's output by ~1e-3."""
    dit = _load(converted["wan"])
    assert dit.cfg.family == "wan" and dit.residual_dtype == f32
    out = _forward(dit, io["wan"], "jit")
    assert rel_err(out, io["wan"][ORACLE["wan"]]) <= TOL
    assert rel_err(out, io["wan"]["velocity"]) > WRONG


STOCK_WRONG = {
    "bf16 residual": ({"residual_dtype": bf16}, []),
    "fused q/k RMSNorm rounding": ({}, [(layers, "rms_norm", _rms_fused_rounding),
                                        (norms_reference, "rms_norm", _rms_fused_rounding)]),
    "q/k norm rounded to bf16 before RoPE": ({}, [(layers, "rms_norm", _rms_bf16_out),
                                                  (norms_reference, "rms_norm", _rms_bf16_out)]),
    "TurboDiffusion family": ({}, [(turbojax.checkpoint, "config_from_meta", _family("turbodiffusion"))]),
}


@pytest.mark.parametrize("variant", list(STOCK_WRONG))
def test_stock_wrong_dtype_flows_are_rejected(converted, io, monkeypatch, variant):
    kw, patches = STOCK_WRONG[variant]
    for mod, attr, new in patches:
        monkeypatch.setattr(mod, attr, new)
    out = _forward(_load(converted["wan"], **kw), io["wan"], "jit")
    assert rel_err(out, io["wan"][ORACLE["wan"]]) > WRONG


def test_the_two_oracles_differ(io):
    """The stock and TurboDiffusion flows are far apart on the same (bf16-rounded vs fp32) weights: a model that
    mixed the families up could not match both."""
    assert rel_err(io["turbo"][ORACLE["turbo"]], io["wan"][ORACLE["wan"]]) > WRONG
