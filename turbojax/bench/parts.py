"""The measurements of `turbojax bench`: the presets, one function per part, and the worker that runs one of them.

Every part builds its own models with random weights at the preset's real shapes (speed depends on shapes and
dtypes, not on the values), measures, and returns the fields of one result row (the schema is in harness.py).

    python -m turbojax.bench.parts '{"preset": "tiny", "part": "dit", "attention": "dense", "linears": "float", ...}'

runs one task in this fresh process and prints its row as JSON after ROW_MARK: the harness's worker, so that the
device's peak_bytes_in_use (which JAX cannot reset) is the row's own.

Model construction: the DiT and the VAE are drawn on the device (a bf16 DiT in one compiled program, as
dit_forward.random_dit; a W8A8 one leaf by leaf, as random_w8a8_dit); the umT5 text encoder and the A14B experts of
a pipeline are drawn on the device, then moved to host memory, as loading a checkpoint leaves them, and the pipeline
copies them up when it needs them. Drawing on the device can leave a transient above the weights: rows record the
peak after building (build_peak_bytes) beside the peak at the end, so a peak that the build, not the measured work,
set is visible as such.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from pallas_kernels.int8_matmul import reference as int8_reference
from turbojax.bench.dit_forward import forward_inputs, random_dit, time_forward, time_sampler
from turbojax.bench.text_encode import random_umt5
from turbojax.bench.timing import memory_stat, time_first_call
from turbojax.bench.vae_decode import random_vae
from turbojax.models import vae as vae_mod
from turbojax.models.attention import AttentionSpec
from turbojax.models.config import WanConfig, get_preset
from turbojax.models.umt5 import UMT5_PRESETS, UMT5Encoder
from turbojax.models.wan_dit import WanDiT
from turbojax.pipelines import I2VPipeline, T2VPipeline, sizes, tiny
from turbojax.pipelines.pipeline import TextStage, attention_spec
from turbojax.sampling import RCMSampler, RCMSchedule
from turbojax.text import TextEncoder, UMT5Tokenizer
from turbojax.video import image_to_video, write_mp4

ROW_MARK = "turbojax-bench-row: "
NUM_STEPS = 4
SEED = 0
EXPERT_SEEDS = {"high": 0, "low": 1}
# Long English prompts, as TurboDiffusion's models are run; a new one per call so no stage reuses the last one's
# embedding. umT5 computes all 512 rows whatever the prompt's length.
PROMPTS = tuple(
    f"A {subject} in the late afternoon, filmed with a slow handheld tracking shot. Warm golden light falls across "
    f"the scene, dust drifts in the air, and the background stays softly out of focus while the camera moves {way}."
    for subject, way in (("red fox trotting through fresh snow at the edge of a pine forest", "to the left"),
                         ("cat walking along a neon-lit street after the rain", "forward"),
                         ("fishing boat leaving a small harbour as gulls circle overhead", "to the right"),
                         ("cyclist riding down a winding mountain road between tall cliffs", "upward"),
                         ("child flying a kite on a windy beach with dunes behind her", "backward")))
MP4_INSTALL = "imageio-ffmpeg not installed (pip install imageio-ffmpeg): no mp4 is written"


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """A benchmark preset: a DiT preset at one resolution ("16:9" row of the size table) and frame count. i2v:
    Wan2.2 I2V-A14B, two experts (high, low) and the image condition."""

    name: str
    dit: str
    resolution: str
    frames: int = 81
    i2v: bool = False

    @property
    def tiny(self) -> bool:
        return self.dit == "tiny"

    @property
    def cfg(self) -> WanConfig:
        cfg = get_preset(self.dit)
        return cfg.replace(in_dim=tiny.I2V_IN_DIM) if self.tiny and self.i2v else cfg

    @property
    def sigma_max(self) -> float:
        return 200.0 if self.i2v else 80.0  # TurboDiffusion's I2V and T2V defaults

    @property
    def experts(self) -> tuple[str, ...]:
        return ("high", "low") if self.i2v else ("high",)

    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return sizes.table_size(self.resolution, "16:9")

    def latent_shape(self, frames: int) -> tuple[int, int, int, int, int]:
        return sizes.latent_shape(1, frames, *self.size())


PRESETS: dict[str, BenchPreset] = {p.name: p for p in (
    BenchPreset("1.3b-480p", "wan2.1-t2v-1.3b", "480p"),
    BenchPreset("14b-480p", "wan2.1-t2v-14b", "480p"),
    BenchPreset("14b-720p", "wan2.1-t2v-14b", "720p"),
    BenchPreset("a14b-i2v-720p", "wan2.2-i2v-a14b", "720p", i2v=True),
    # CPU smoke presets: every component at toy size (pipelines/tiny.py), so the test suite runs every part; one
    # frame, the least that XLA:CPU has to compile (no VAE scan over latent frames).
    BenchPreset("tiny", "tiny", "tiny", frames=1),
    BenchPreset("tiny-i2v", "tiny", "tiny", frames=1, i2v=True),
)}


class Unavailable(Exception):
    """The variant does not exist here (an attention kind turbojax lacks, a missing package): a row, not a crash."""


# ---------------------------------------------------------------------------------------------------------------
# Models with random weights
# ---------------------------------------------------------------------------------------------------------------


def w8a8_copy(dit: WanDiT) -> WanDiT:
    """dit with its block Linears (QUANT_LINEARS) as W8A8: the reference quantiser's int8 weights and 128 x 128
    tile scales of its float weights (what a -quant checkpoint made from them holds); everything else shared."""
    abstract = nnx.eval_shape(lambda: WanDiT(dit.cfg, dtype=dit.dtype, attention=dit.attention, linears="w8a8",
                                             rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    source = dict(nnx.to_flat_state(nnx.state(dit)))
    quantize = jax.jit(jax.vmap(int8_reference.quantize_blockwise))  # over the stacked block axis
    quantized: dict[tuple, tuple] = {}
    leaves = []
    for path, var in nnx.to_flat_state(target):
        *parent, name = path
        if name in ("int8_weight", "scale"):
            parent = tuple(parent)
            if parent not in quantized:
                quantized[parent] = quantize(source[(*parent, "weight")].get_value())
            value = quantized[parent][0 if name == "int8_weight" else 1]
        else:
            value = source[path].get_value()
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def build_dit(preset: BenchPreset, spec: AttentionSpec, linears: str, expert: str = "high") -> WanDiT:
    """One expert of the preset with random weights: the tiny ones drawn on the host (pipelines.tiny), the real
    ones on the device."""
    if preset.tiny:
        dit = tiny.tiny_dit(SEED, expert, i2v=preset.i2v, attention=spec)
        return dit if linears == "float" else w8a8_copy(dit)
    seed = EXPERT_SEEDS[expert]
    dit = random_w8a8_dit(preset.cfg, seed) if linears == "w8a8" else random_dit(preset.cfg, seed=seed)
    dit.attention = spec
    return dit


def random_w8a8_dit(cfg: WanConfig, seed: int) -> WanDiT:
    """A W8A8 DiT drawn leaf by leaf on the device, never holding a bf16 copy of its block Linears: int8 codes
    uniform in [-127, 127] with one scale per Linear that gives its weights a 1/sqrt(fan_in) spread (as a quantised
    N(0, 1/fan_in) weight has), the other matrices N(0, 1/fan_in), norm gains 1, biases 0. Quantising a drawn bf16
    model (WanDiT(linears="w8a8") under one jit) holds every stacked bf16 weight at once, which at 14B sets a device
    peak above what generation needs; this keeps the build's peak at the model's size plus one layer's draw."""
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, linears="w8a8", rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    key = jax.random.key(seed)
    leaves = [(path, var.replace(_draw_leaf(path, var.get_value(), jax.random.fold_in(key, i))))
              for i, (path, var) in enumerate(nnx.to_flat_state(state))]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


UNIFORM_INT8_STD = math.sqrt((255**2 - 1) / 12)  # of codes uniform over the 255 integers in [-127, 127]


def _draw_leaf(path: tuple, leaf: jax.ShapeDtypeStruct, key: jax.Array) -> jax.Array:
    """One parameter of random_w8a8_dit by its name; int8 codes [L, N, K] one layer at a time."""
    name, parent = path[-1], str(path[-2]) if len(path) > 1 else ""
    shape, dtype = leaf.shape, leaf.dtype
    if name == "int8_weight":
        out = jnp.zeros(shape, jnp.int8)
        for layer in range(shape[0]):
            out = _set_int8_layer(out, jax.random.fold_in(key, layer), layer)
        return out
    if name == "scale":  # [L, N/128, K/128]; K is at most 127 more than 128 x the last dim
        return jnp.full(shape, 1.0 / (UNIFORM_INT8_STD * math.sqrt(128 * shape[-1])), dtype)
    if name == "bias" or (name == "weight" and parent.startswith("norm")):
        return jnp.full(shape, 0.0 if name == "bias" else 1.0, dtype)
    return _normal(key, shape, dtype)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _set_int8_layer(out: jax.Array, key: jax.Array, layer: int) -> jax.Array:
    return out.at[layer].set(jax.random.randint(key, out.shape[1:], -127, 128, jnp.int8))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """N(0, 1/fan_in) in dtype, fan_in the last axis (weights are [..., out, in]; a modulation table [..., C])."""
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])).astype(dtype)


def build_vae(preset: BenchPreset) -> vae_mod.WanVAE:
    if preset.tiny:
        return tiny.tiny_vae(SEED)
    vae = random_vae(vae_mod.VAEConfig(), jnp.bfloat16, seed=SEED)
    vae.conv = "ndhwc" if jax.default_backend() == "gpu" else "fold"  # load_vae's default per device
    return vae


def build_umt5(preset: BenchPreset) -> UMT5Encoder:
    if preset.tiny:
        abstract = nnx.eval_shape(lambda: UMT5Encoder(UMT5_PRESETS["tiny"], rngs=nnx.Rngs(0)))
        return tiny.random_init(abstract, SEED, tiny.out_in_fan_in)
    return random_umt5("umt5-xxl", seed=SEED)


def tokenizer() -> UMT5Tokenizer:
    """The tiny preset's SentencePiece model for every preset: the real umT5 vocabulary is not shipped, and the
    encoder's cost does not depend on which ids fill its 512 rows."""
    return UMT5Tokenizer(tiny.TOKENIZER)


def to_host(module: nnx.Module) -> nnx.Module:
    """The module with its weights in host memory and its device copy freed, as a checkpoint loads into the host."""
    graphdef, state = nnx.split(module)
    host = jax.devices("cpu")[0]
    on_host = jax.device_put(state, host)
    if jax.devices()[0] != host:  # on a CPU-only machine both are the same buffers
        for leaf in jax.tree.leaves(state):
            leaf.delete()
    return nnx.merge(graphdef, on_host)


def on_device(x: np.ndarray) -> jax.Array:
    """A host array placed on the device as the pipeline places its arrays (committed), so that a part and a later
    pipeline in the same process share one compiled program."""
    return jax.device_put(x, jax.devices()[0])


def synthetic_frames(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [frames, H, W, 3]: a colour gradient that drifts a few pixels per frame, a stand-in for decoded video
    (x264's speed depends on the content: a real video's detail lies between this and noise)."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    channels = [(x + 3 * t) / width, (y + 2 * t) / height, (x + y - 4 * t) / (width + height)]
    return (np.stack([np.mod(c, 1.0) for c in channels], -1) * 255).astype(np.uint8)


def ffmpeg_reason() -> str | None:
    """Why no mp4 can be written here, or None."""
    return None if importlib.util.find_spec("imageio_ffmpeg") else MP4_INSTALL


# ---------------------------------------------------------------------------------------------------------------
# Parts: each returns the measured fields of a row
# ---------------------------------------------------------------------------------------------------------------


class Peaks:
    """The device's peak bytes in use after building the models (mark_built), for the row's build_peak_bytes."""

    def __init__(self):
        self.build: int | None = None

    def mark_built(self) -> None:
        self.build = memory_stat("peak_bytes_in_use")


def measure_dit(preset, spec, linears, frames, iters, peaks) -> dict:
    dit = build_dit(preset, spec, linears)
    peaks.mark_built()
    shape = preset.latent_shape(frames)
    r = time_forward(dit, forward_inputs(preset.cfg, shape), iters)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    return {"what": f"one DiT forward, {tokens:,} tokens", "median_ms": r["median_ms"], "min_ms": r["min_ms"],
            "compile_s": r["compile_s"], "program_bytes": r["program_bytes"],
            "extra": {"tokens": tokens, "latent_shape": list(shape),
                      "finite": bool(np.isfinite(np.asarray(r["out"])).all())}}


def measure_sampler(preset, spec, linears, frames, iters, peaks) -> dict:
    experts = [build_dit(preset, spec, linears, name) for name in preset.experts]
    schedule = RCMSchedule(num_steps=NUM_STEPS, sigma_max=preset.sigma_max)
    sampler = RCMSampler(*experts, schedule=schedule)
    peaks.mark_built()
    shape = preset.latent_shape(frames)
    inputs = forward_inputs(preset.cfg, shape)
    r = time_sampler(sampler, inputs[2], shape, iters, *inputs[3:])
    per_step = schedule.experts() if preset.i2v else ["high"] * NUM_STEPS
    return {"what": f"whole {NUM_STEPS}-step rCM sampler, one jitted program"
                    + (", both experts on the device" if preset.i2v else ""),
            "median_ms": r["median_ms"], "min_ms": r["min_ms"], "first_call_s": r["first_call_s"],
            "extra": {"latent_shape": list(shape), "experts_per_step": per_step, "sigma_max": preset.sigma_max}}


def measure_text(preset, frames, iters, peaks) -> dict:
    enc = TextEncoder(build_umt5(preset), tokenizer())
    peaks.mark_built()
    r = time_first_call(lambda i: enc.encode([PROMPTS[i % len(PROMPTS)]]), iters)
    return {"what": "umT5 encode of one prompt (tokenise, 512 rows, zero the padding)", **r,
            "extra": {"weights_bytes": enc.nbytes}}


def measure_vae_decode(preset, frames, iters, peaks) -> dict:
    """WanVAE.decode, the pipeline's call (its jitted program, which a later pipeline in this process reuses)."""
    vae = build_vae(preset)
    peaks.mark_built()
    z = on_device(np.random.default_rng(1).standard_normal(preset.latent_shape(frames), np.float32))
    r = time_first_call(lambda i: vae.decode(z), iters)
    h, w = preset.size()
    return {"what": f"VAE decode to {frames} frames of {w}x{h} ({vae.conv} convolutions)", **r,
            "extra": {"conv": vae.conv}}


def measure_vae_encode(preset, frames, iters, peaks) -> dict:
    """WanVAE.encode of the I2V input video (the image, then zero frames), as the pipeline calls it."""
    vae = build_vae(preset)
    peaks.mark_built()
    h, w = preset.size()
    image = np.random.default_rng(2).uniform(-1.0, 1.0, (3, h, w)).astype(np.float32)
    video = image_to_video(image, frames)
    r = time_first_call(lambda i: vae.encode(video), iters)
    return {"what": f"I2V image encode: the image and {frames - 1} zero frames at {w}x{h} ({vae.conv})", **r,
            "extra": {"conv": vae.conv}}


def measure_mp4(preset, frames, iters, peaks) -> dict:
    reason = ffmpeg_reason()
    if reason:
        raise Unavailable(reason)
    h, w = preset.size()
    video = synthetic_frames(frames, h, w)
    peaks.mark_built()
    with tempfile.TemporaryDirectory() as tmp:
        r = time_first_call(lambda i: write_mp4(Path(tmp) / f"{i}.mp4", video, (h, w)), iters)
        size = (Path(tmp) / "0.mp4").stat().st_size
    return {"what": f"write_mp4 of {frames} synthetic frames of {w}x{h} (H.264, crf 25)", **r,
            "extra": {"mp4_bytes": size}}


def build_pipeline(preset: BenchPreset, spec: AttentionSpec, linears: str, frames: int, offload: bool = False):
    """The preset's pipeline from random models, as its load() leaves them: a T2V DiT on the device, I2V's experts
    in host memory (the pipeline moves them), the VAE on the device, and the text encoder as a host copy that each
    load puts on the device as a new TextEncoder (load_text_encoder does the same), freed after the prompt
    (TextStage keep=False). offload: the pipeline's (the DiT on the device for the steps only). Returns the pipeline
    and the list its loads append their seconds to."""
    graphdef, host_state = nnx.split(to_host(build_umt5(preset)))
    spm = tokenizer()
    device = jax.devices()[0]
    load_times: list[float] = []

    def load() -> TextEncoder:
        t0 = time.perf_counter()
        # A copy even where host and device are one (the CPU): the pipeline frees the encoder after each prompt.
        state = jax.block_until_ready(jax.device_put(host_state, device, may_alias=False))
        load_times.append(time.perf_counter() - t0)
        return TextEncoder(nnx.merge(graphdef, state), spm)

    if preset.i2v:
        experts = {name: to_host(build_dit(preset, spec, linears, name)) for name in preset.experts}
    else:
        experts = {"high": build_dit(preset, spec, linears)}
    kind = I2VPipeline if preset.i2v else T2VPipeline
    # offload=None leaves A14B its own choice (both experts stay when they fit), as `turbojax generate` does.
    pipe = kind(experts, build_vae(preset), TextStage(load, keep=False), offload=offload or None, progress=False,
                verbose=False, defaults={"resolution": preset.resolution, "num_frames": frames})
    return pipe, load_times


def generation(pipe, preset: BenchPreset, image: Path | None, call: int, out_dir: Path,
               load_times: list[float]) -> dict[str, float]:
    """One generation with a new prompt and seed, its mp4 written when imageio-ffmpeg is installed: seconds per
    stage, the text encoder's load (host to device) split from its encode."""
    loads_before = len(load_times)
    prompt = PROMPTS[call % len(PROMPTS)]
    video = pipe(prompt, image, seed=call) if preset.i2v else pipe(prompt, seed=call)
    if ffmpeg_reason() is None:
        video.save(out_dir / f"{call}.mp4")
    stages = dict(video.timings)
    load_s = sum(load_times[loads_before:])
    stages["text_encode"] -= load_s
    return {"text_load": load_s, **stages}


def measure_pipeline(preset, spec, linears, frames, iters, peaks, offload: bool = False) -> dict:
    """The end-to-end pipeline. Call 0 is a one-shot `turbojax generate` (the text encoder loaded for the prompt
    and freed after it; compilation included): its seconds per stage and the device peak after it. Then the encoder
    is kept, as `turbojax serve` does: call 1 loads it, and calls 2.. (iters of them) are the warm timings, a new
    prompt and seed each."""
    pipe, load_times = build_pipeline(preset, spec, linears, frames, offload)
    peaks.mark_built()
    with tempfile.TemporaryDirectory() as tmp:
        image = write_test_image(Path(tmp), *preset.size()) if preset.i2v else None
        run = lambda call: generation(pipe, preset, image, call, Path(tmp), load_times)
        first = run(0)
        generate_peak = memory_stat("peak_bytes_in_use")
        pipe.text.keep = True
        run(1)
        warm = [run(2 + i) for i in range(iters)]
    stages = {k: statistics.median(c[k] for c in warm) for k in warm[0]}
    totals = [sum(c.values()) for c in warm]
    writes = "mp4 written" if "write" in stages else MP4_INSTALL
    return {"what": f"{'I2V' if preset.i2v else 'T2V'} pipeline, {frames} frames at {preset.resolution}, "
                    f"{NUM_STEPS} steps; warm calls keep the text encoder ({writes})",
            "median_ms": 1e3 * statistics.median(totals), "min_ms": 1e3 * min(totals),
            "first_call_s": sum(first.values()), "stages": stages,
            "extra": {"first_call_stages": first, "generate_peak_bytes": generate_peak, "offload": offload,
                      "expert_transfers": [list(t) for t in pipe.experts.transfers]}}


def measure_first_generation(preset, spec, linears, frames, iters, peaks, offload: bool = False) -> dict:
    """One `turbojax generate` in this process (the compile-cache part runs it twice, cold and warm cache)."""
    pipe, load_times = build_pipeline(preset, spec, linears, frames, offload)
    peaks.mark_built()
    with tempfile.TemporaryDirectory() as tmp:
        image = write_test_image(Path(tmp), *preset.size()) if preset.i2v else None
        stages = generation(pipe, preset, image, 0, Path(tmp), load_times)
    return {"what": "first generation in a fresh process", "first_call_s": sum(stages.values()), "stages": stages}


def write_test_image(folder: Path, height: int, width: int) -> Path:
    """A PNG gradient of the video's size: the I2V input (its content does not change the cost)."""
    path = folder / "input.png"
    Image.fromarray(synthetic_frames(1, height, width)[0]).save(path)
    return path


DIT_PARTS = {"dit": measure_dit, "sampler": measure_sampler, "pipeline": measure_pipeline,
             "first-generation": measure_first_generation}
PIPELINE_PARTS = ("pipeline", "first-generation")  # the parts that build a pipeline, and so take its offload
OTHER_PARTS = {"text": measure_text, "vae-decode": measure_vae_decode, "vae-encode": measure_vae_encode,
               "mp4": measure_mp4}


# ---------------------------------------------------------------------------------------------------------------
# One task -> one row
# ---------------------------------------------------------------------------------------------------------------


def is_oom(text: str) -> bool:
    return any(marker in text for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def failure(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception: unavailable, oom or error, with its first line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {message}"[:400] if not isinstance(exc, Unavailable) else message
    if isinstance(exc, Unavailable):
        return "unavailable", reason
    return ("oom" if is_oom(str(exc)) else "error"), reason


def measure(task: dict) -> dict:
    """Runs one task {preset, part, attention, linears, frames, iters, sla_topk, offload} in this process: its row's
    measured fields, status and reason, device and memory peaks (the scope is set by the caller)."""
    preset = PRESETS[task["preset"]]
    frames = task.get("frames") or preset.frames
    peaks = Peaks()
    fields: dict = {"status": "ok", "reason": None}
    try:
        if task["part"] in DIT_PARTS:
            spec = attention_spec(task["attention"], task.get("sla_topk", 0.1))
            options = {"offload": True} if task.get("offload") and task["part"] in PIPELINE_PARTS else {}
            fields.update(DIT_PARTS[task["part"]](preset, spec, task["linears"], frames, task["iters"], peaks,
                                                  **options))
        else:
            fields.update(OTHER_PARTS[task["part"]](preset, frames, task["iters"], peaks))
    except Exception as exc:  # one row per failure: an OOM or a kernel that does not lower must not stop the run
        fields["status"], fields["reason"] = failure(exc)
        if fields["status"] == "error":
            fields["extra"] = {"traceback": traceback.format_exc().splitlines()[-12:]}
    device = jax.devices()[0]
    return {**fields, "frames": frames, "device": f"{device.platform}: {device.device_kind}",
            "peak_bytes": memory_stat("peak_bytes_in_use"), "build_peak_bytes": peaks.build}


def configure_compilation_cache(cache_dir: str | None) -> None:
    """A worker's persistent compilation cache: off (first calls compile for real), or every program cached in
    cache_dir (no minimum compile time or size) for the compile-cache part."""
    if cache_dir is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    """The worker: one task (JSON) in this fresh process, its row printed after ROW_MARK."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m turbojax.bench.parts TASK_JSON (the worker of `turbojax bench`)", file=sys.stderr)
        return 2
    task = json.loads(argv[0])
    configure_compilation_cache(task.get("cache_dir"))
    row = measure(task)
    print(ROW_MARK + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
