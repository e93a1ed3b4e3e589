"""Text-to-video and image-to-video pipelines: prompt (and image) -> umT5 -> rCM sampling over the DiT -> VAE -> frames.

    pipe = T2VPipeline.load(dit="ckpt/turbowan-1.3b", text_encoder="ckpt/umt5", vae="ckpt/wan21-vae")
    video = pipe("A cat walks along a neon-lit street at night.", seed=0)   # frames: uint8 [1, 81, 480, 832, 3]
    video.save("out/cat.mp4")

The stages follow TurboDiffusion's wan2.1_t2v_infer.py / wan2.2_i2v_infer.py (acceleration.md 2 and 7). The rCM
steps run one jitted DiT step program per expert (compiled ahead of time, so its memory analysis can decide where
the experts live; a new seed, prompt or image reuses it), a step at a time so that two-expert models can swap
experts between steps and the progress bar advances per step. Noise is drawn like RCMSampler's, so a seed gives the
same latents as `RCMSampler(high, low)(context, cond, seed=...)`.

Memory plan (see experts.py): the DiT (T2V) and the VAE stay on the device; both A14B experts too when they fit with
everything else, else only the running one. offload=True keeps the DiT weights in host memory and puts them on the
device only for the steps (one host-to-device copy per generation and expert), so the text encoder and the VAE decode
never share the device with them. The text encoder is loaded for a new prompt and freed after encoding,
unless keep_text_encoder (what `turbojax serve` does), and the last prompt's embedding is kept, so a new
seed or image with the same prompt skips the encoder.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from turbojax.checkpoint import FORMAT as DIT_FORMAT
from turbojax.checkpoint import VAE_FORMAT, CheckpointFormatError, config_from_meta, load_dit, load_vae, read_meta
from turbojax.models.attention import AttentionSpec
from turbojax.models.config import WanConfig
from turbojax.models.vae import WanVAE, denormalize_latents, normalize_latents
from turbojax.models.wan_dit import LINEARS, WanDiT
from turbojax.pipelines import sizes, tiny
from turbojax.pipelines.experts import ExpertBank, both_fit, device_memory_limit, tree_bytes
from turbojax.sampling.rcm import RCMSchedule, draw_noise, rcm_step
from turbojax.text import FORMAT as UMT5_FORMAT, TOKENIZER_FILE, TextEncoder, load_text_encoder
from turbojax.video import FPS, frames_uint8, image_size, image_to_video, load_image, write_mp4

MASK_CHANNELS = 4
T2V_DEFAULTS = dict(num_steps=4, sigma_max=80.0, num_frames=81, resolution="480p", aspect_ratio="16:9", seed=0,
                    num_samples=1)
I2V_DEFAULTS = dict(T2V_DEFAULTS, sigma_max=200.0, resolution="720p", adaptive_resolution=False, mode="sde",
                    boundary=0.9)
STAGES = {"text_encode": "text encode", "image_encode": "image encode", "diffusion": "diffusion",
          "vae_decode": "VAE decode", "write": "write"}


# ---------------------------------------------------------------------------------------------------------------
# Requests: every option checked before any model runs
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked generation request: the prompt, the image (I2V), the video size and the rCM schedule."""

    prompt: str
    image: Path | None
    height: int
    width: int
    num_frames: int
    num_samples: int
    seed: int
    schedule: RCMSchedule

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return sizes.latent_shape(self.num_samples, self.num_frames, self.height, self.width)


def schedule_of(options: dict) -> RCMSchedule:
    """The rCM schedule of complete options (T2V ones have no mode or boundary: SDE, 0.9)."""
    return RCMSchedule(num_steps=options["num_steps"], sigma_max=float(options["sigma_max"]),
                       mode=options.get("mode", "sde"), boundary=options.get("boundary", 0.9))


def check_options(kind: str, **options) -> dict:
    """The options of `kind` ("t2v" or "i2v") completed with its defaults (T2V_DEFAULTS / I2V_DEFAULTS) and checked,
    all but the prompt and the image: one ValueError per bad value."""
    defaults = I2V_DEFAULTS if kind == "i2v" else T2V_DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        hint = " (an I2V option)" if kind == "t2v" and set(unknown) <= set(I2V_DEFAULTS) else ""
        raise ValueError(f"unknown {kind.upper()} option {', '.join(unknown)}{hint}; options: {', '.join(defaults)}")
    opt = {**defaults, **options}
    sizes.check_num_frames(opt["num_frames"])
    for name, low in (("num_samples", 1), ("seed", 0)):
        if not isinstance(opt[name], (int, np.integer)) or isinstance(opt[name], bool) or opt[name] < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {opt[name]!r}")
    schedule_of(opt)
    sizes.table_size(opt["resolution"], opt["aspect_ratio"])
    return opt


def plan(kind: str, prompt: str, image: str | Path | None = None, **options) -> Plan:
    """Checks a whole request (check_options, a non-empty prompt, an image for I2V only, readable) and resolves the
    video size. Raises one ValueError (FileNotFoundError for a missing image) per bad input."""
    opt = check_options(kind, **options)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the video to generate")
    schedule = schedule_of(opt)
    height, width = sizes.table_size(opt["resolution"], opt["aspect_ratio"])
    if kind == "t2v" and image is not None:
        raise ValueError("a text-to-video model takes no image; image-to-video needs an I2V checkpoint "
                         "(Wan2.2 I2V-A14B)")
    if kind == "i2v":
        if image is None:
            raise ValueError("image-to-video needs an image (image=PATH; --image or, in serve, /set image PATH)")
        image = Path(image)
        img_size = image_size(image)  # also the readability check, before any model runs
        if opt["adaptive_resolution"]:
            height, width = sizes.adaptive_size(img_size, opt["resolution"], opt["aspect_ratio"])
    return Plan(prompt, image, height, width, int(opt["num_frames"]), int(opt["num_samples"]), int(opt["seed"]),
                schedule)


def attention_spec(attention: str | AttentionSpec, sla_topk: float = 0.1) -> AttentionSpec:
    """"dense", or "sla" / "sagesla" (with sla_topk), as an AttentionSpec."""
    if isinstance(attention, AttentionSpec):
        return attention
    if attention == "dense":
        return AttentionSpec("dense")
    if attention in ("sla", "sagesla"):
        return AttentionSpec(attention, topk=sla_topk)
    raise ValueError(f"unknown attention {attention!r}; choose dense, sla or sagesla")


def check_linears_option(linears: str | None) -> None:
    """load_dit's linears: None (follow the folder: W8A8 for -quant), "w8a8" (TurboDiffusion's --quant_linear) or
    "float"."""
    if linears not in (None, *LINEARS):
        raise ValueError(f"unknown linears {linears!r}; choose {', '.join(LINEARS)} (or None: follow the folder)")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders: checked (config.json only) before any weights load
# ---------------------------------------------------------------------------------------------------------------


def check_folders(kind: str, folders: dict[str, str | Path | None]) -> WanConfig:
    """Checks the converted folders of a pipeline and that they belong together; returns the DiT's config.

    folders maps a label (what the caller calls the part: "dit", "--vae"...) to a path, in the order dit (or high),
    [low,] text encoder, VAE. Missing parts are named together in one error; a folder of the wrong kind, or parts
    that do not fit each other (text width, latent channels, T2V vs I2V), in one error each."""
    missing = [label for label, path in folders.items() if path is None]
    if missing:
        raise ValueError(f"missing checkpoint parts: {', '.join(missing)} (converted folders: turbojax-convert)")
    labels = list(folders)
    dit_labels, text_label, vae_label = labels[:-2], labels[-2], labels[-1]

    def meta(label: str, fmt: str) -> dict:
        try:
            return read_meta(folders[label], fmt)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{label}: {e}") from None

    cfgs = [config_from_meta(meta(label, DIT_FORMAT)) for label in dit_labels]
    cfg = cfgs[0]
    if any(c != cfg for c in cfgs[1:]):
        raise CheckpointFormatError(f"{dit_labels[0]} and {dit_labels[1]} are different models; the two experts of "
                                    "Wan2.2 A14B share one configuration")
    want_cond = MASK_CHANNELS + cfg.out_dim if kind == "i2v" else 0
    if cfg.cond_dim != want_cond:
        what = "an I2V model" if cfg.cond_dim else "a T2V model"
        use = "the T2V pipeline (no image)" if kind == "i2v" else "the I2V pipeline (with an image)"
        raise CheckpointFormatError(f"{dit_labels[0]}: {folders[dit_labels[0]]} is {what} (in_dim {cfg.in_dim}); "
                                    f"use {use}")
    text = meta(text_label, UMT5_FORMAT)["model"]
    if text["dim"] != cfg.text_dim:
        raise CheckpointFormatError(f"{text_label}: the text encoder's width {text['dim']} is not the DiT's "
                                    f"text_dim {cfg.text_dim}; they do not belong together")
    if not (Path(folders[text_label]) / TOKENIZER_FILE).is_file():
        raise CheckpointFormatError(f"{text_label}: {folders[text_label]} has no {TOKENIZER_FILE}; convert the "
                                    "encoder with google/umt5-xxl/spiece.model beside it")
    z_dim = meta(vae_label, VAE_FORMAT)["model"]["z_dim"]
    if z_dim != cfg.out_dim:
        raise CheckpointFormatError(f"{vae_label}: the VAE has {z_dim} latent channels, the DiT {cfg.out_dim}; use "
                                    "the Wan2.1 VAE")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


class TextStage:
    """The pipeline's umT5: loaded on first use, then kept on the device (keep=True) or freed after each encoding.
    The last prompt's embedding [1, 512, dim] stays, so repeating a prompt does not reload the encoder."""

    def __init__(self, load: Callable[[], TextEncoder], *, keep: bool):
        self._load = load
        self.keep = keep
        self.encoder: TextEncoder | None = None
        self.nbytes = 0  # weights of the last loaded encoder; 0 until one was loaded
        self._last: tuple[str, jax.Array] | None = None

    def encode(self, prompt: str) -> jax.Array:
        if self._last is not None and self._last[0] == prompt:
            return self._last[1]
        if self.encoder is None:
            self.encoder = self._load()
            self.nbytes = self.encoder.nbytes
        context = jax.block_until_ready(self.encoder.encode([prompt]))
        if not self.keep:
            self.encoder.unload()
            self.encoder = None
        self._last = (prompt, context)
        return context


def dit_step(graphdef: nnx.GraphDef, mode: str, state, x, t_cur, t_next, net_t, eps, context, cond) -> jax.Array:
    """One rCM step (sampling.rcm.rcm_step) with the expert of graphdef + state: the traced body of step_program."""
    return rcm_step(mode, nnx.merge(graphdef, state), x, t_cur, t_next, net_t, eps, context, cond)


# Compiled DiT step programs by (graphdef, mode, argument types): shared by every pipeline of the process, so
# both A14B experts (one graphdef) and repeated pipelines of one model compile once per shape.
_STEP_PROGRAMS: dict[tuple, jax.stages.Compiled] = {}


def step_program(graphdef: nnx.GraphDef, mode: str, state_types, x_type: jax.ShapeDtypeStruct,
                 context_type: jax.ShapeDtypeStruct, cond_type: jax.ShapeDtypeStruct | None) -> jax.stages.Compiled:
    """The jitted rCM step of one expert, compiled for these argument types: (state, x [B,16,T,h,w] fp32, t_cur,
    t_next, net_t fp32 scalars, eps like x, context [B,512,D], cond [B,20,T,h,w] or None) -> x fp32."""
    leaves = tuple((a.shape, a.dtype) for a in jax.tree.leaves((state_types, x_type, context_type, cond_type)))
    key = (graphdef, mode, x_type.sharding, leaves, cond_type is None)
    if key not in _STEP_PROGRAMS:
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=x_type.sharding)
        fn = jax.jit(lambda *args: dit_step(graphdef, mode, *args))
        _STEP_PROGRAMS[key] = fn.lower(state_types, x_type, scalar, scalar, scalar, x_type, context_type,
                                       cond_type).compile()
    return _STEP_PROGRAMS[key]


def working_bytes(program: jax.stages.Compiled) -> int:
    """Device memory a step needs besides its arguments: XLA's temporaries and the output."""
    stats = program.memory_analysis()
    return 0 if stats is None else stats.temp_size_in_bytes + stats.output_size_in_bytes


@jax.jit
def _condition(mu: jax.Array) -> jax.Array:
    """I2V condition from the raw VAE mean mu [1, 16, T, h, w]: concat_C(mask [1, 4, T, h, w] = 1 on latent frame
    0, bf16(normalise(mu))) -> [1, 20, T, h, w] bf16 (acceleration.md 2.7)."""
    lat = normalize_latents(mu).astype(jnp.bfloat16)
    mask = jnp.zeros((lat.shape[0], MASK_CHANNELS, *lat.shape[2:]), jnp.bfloat16).at[:, :, 0].set(1)
    return jnp.concatenate([mask, lat], axis=1)


def _sharded(x: jax.Array | np.ndarray, device: jax.Device) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device))


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{STAGES.get(k, k)} {v:.2f} s" for k, v in timings.items())


@dataclasses.dataclass
class Video:
    """A generated video. frames: uint8 [num_samples, T, H, W, 3]; latents: the sampler's fp32 output
    [num_samples, 16, T', H/8, W/8]; timings: seconds per stage (a first call includes compilation); experts: the
    expert that ran each rCM step ("high" only for one-expert models)."""

    frames: np.ndarray
    latents: np.ndarray
    timings: dict[str, float]
    experts: tuple[str, ...]
    fps: int = FPS

    def tiled(self) -> np.ndarray:
        """[T, H, num_samples * W, 3]: the samples side by side, as the mp4 shows them (acceleration.md 7)."""
        b, t, h, w, c = self.frames.shape
        return self.frames.transpose(1, 2, 0, 3, 4).reshape(t, h, b * w, c)

    def save(self, path: str | Path) -> Path:
        """Writes the H.264 mp4 (libx264 crf 25, yuv420p, 16 fps) atomically; adds timings["write"]."""
        start = time.perf_counter()
        tiled = self.tiled()
        out = write_mp4(path, tiled, tiled.shape[1:3], fps=self.fps)
        self.timings["write"] = time.perf_counter() - start
        return out


# ---------------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------------


class _Pipeline:
    kind = ""

    def __init__(self, experts: dict[str, WanDiT], vae: WanVAE, text: TextStage, *, offload: bool | None = None,
                 defaults: dict | None = None, progress: bool = True, verbose: bool = True):
        cfgs = [dit.cfg for dit in experts.values()]
        if any(c != cfgs[0] for c in cfgs):
            raise ValueError("the experts are different models; both A14B experts share one configuration")
        if vae.cfg.z_dim != cfgs[0].out_dim:
            raise ValueError(f"the VAE has {vae.cfg.z_dim} latent channels, the DiT {cfgs[0].out_dim}")
        self.cfg = cfgs[0]
        self.device = jax.devices()[0]
        self.experts = ExpertBank(experts, self.device)
        if offload:
            self.experts.release_all()
        self.vae = vae
        self.text = text
        self.offload = offload
        self.defaults = {**(I2V_DEFAULTS if self.kind == "i2v" else T2V_DEFAULTS), **(defaults or {})}
        self.progress = progress
        self.verbose = verbose

    def plan(self, prompt: str, image: str | Path | None = None, **options) -> Plan:
        return plan(self.kind, prompt, image, **{**self.defaults, **options})

    def keep_both_experts(self, working: int) -> bool:
        """Whether every expert stays on the device (offload=None: if they fit, see experts.both_fit)."""
        if self.offload is not None or len(self.experts.names) == 1:
            return not self.offload
        other = tree_bytes(nnx.state(self.vae)) + (self.text.nbytes if self.text.keep else 0)
        # A text encoder loaded for the next prompt meets the resident experts: count it like a step's temporaries.
        transient = max(working, 0 if self.text.keep else self.text.nbytes)
        return both_fit([self.experts.nbytes(n) for n in self.experts.names], other, transient,
                        device_memory_limit(self.device))

    def _generate(self, p: Plan) -> Video:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        context = self.text.encode(p.prompt)
        if context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"the text encoder gives width {context.shape[-1]}, the DiT takes {self.cfg.text_dim}")
        context = jnp.repeat(context, p.num_samples, axis=0)
        timings["text_encode"] = time.perf_counter() - start

        cond = None
        if self.kind == "i2v":
            start = time.perf_counter()
            mu = self.vae.encode(image_to_video(load_image(p.image, p.height, p.width), p.num_frames))
            cond = jax.block_until_ready(jnp.repeat(_condition(mu), p.num_samples, axis=0))
            timings["image_encode"] = time.perf_counter() - start

        start = time.perf_counter()
        latents, experts = self._diffuse(p, context, cond)
        timings["diffusion"] = time.perf_counter() - start

        start = time.perf_counter()
        frames = frames_uint8(self.vae.decode(denormalize_latents(latents)))  # [B, T, H, W, 3] uint8
        timings["vae_decode"] = time.perf_counter() - start
        if self.verbose:
            print(f"timings: {format_timings(timings)}")
        return Video(frames, np.asarray(latents), timings, tuple(experts))

    def _diffuse(self, p: Plan, context: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, list[str]]:
        """The rCM loop a step at a time -> (latents fp32 [B, 16, T, h, w], expert of each step)."""
        schedule = p.schedule
        n = schedule.num_steps
        names = schedule.experts() if len(self.experts.names) == 2 else ["high"] * n
        noise = jax.device_put(draw_noise(jax.random.key(p.seed), n, p.latent_shape), self.device)
        x_type = _sharded(noise[0], self.device)
        context_type = _sharded(context, self.device)
        cond_type = None if cond is None else _sharded(cond, self.device)
        programs = {name: step_program(self.experts.graphdefs[name], schedule.mode,
                                       self.experts.abstract_state(name), x_type, context_type, cond_type)
                    for name in dict.fromkeys(names)}
        keep = self.keep_both_experts(max(working_bytes(prog) for prog in programs.values()))
        t = schedule.rf_times()
        net_t = schedule.net_timesteps()
        x = float(t[0]) * noise[0]
        for i in tqdm(range(n), desc="diffusion", unit="step", disable=not self.progress):
            name = names[i]
            self.experts.activate(name, keep_others=keep)
            x = programs[name](self.experts.device_state(name), x, np.float32(t[i]), np.float32(t[i + 1]),
                               np.float32(net_t[i]), noise[i + 1], context, cond)
        x = jax.block_until_ready(x)
        if not keep:  # the VAE decode and the next prompt's text encoder get the device without a DiT
            self.experts.release_all()
        return x, names


def _load_common(text_encoder: str | Path, vae: str | Path, keep_text_encoder: bool, progress: bool):
    text = TextStage(lambda: load_text_encoder(text_encoder, progress=progress), keep=keep_text_encoder)
    return text, load_vae(vae)


class T2VPipeline(_Pipeline):
    """Wan2.1 T2V (1.3B, 14B): pipe(prompt, **options) -> Video. Options (T2V_DEFAULTS): num_steps 1-4,
    sigma_max (80), num_frames 4k+1 (81), resolution "480p" | "720p", aspect_ratio "16:9" | "9:16" | "1:1" |
    "4:3" | "3:4", seed, num_samples (side by side in the mp4)."""

    kind = "t2v"

    def __call__(self, prompt: str, **options) -> Video:
        return self._generate(self.plan(prompt, **options))

    @classmethod
    def load(cls, dit: str | Path, text_encoder: str | Path, vae: str | Path, *, attention="dense",
             sla_topk: float = 0.1, linears: str | None = None, keep_text_encoder: bool = False,
             offload: bool = False, progress: bool = True, verbose: bool = True) -> T2VPipeline:
        """From converted folders (turbojax-convert). linears goes to load_dit: None follows the folder (W8A8 for
        a -quant checkpoint), "w8a8" quantises a bf16 one at load, "float" dequantises a -quant one. offload: keep
        the DiT in host memory, on the device only for the steps (see the module's memory plan)."""
        check_folders("t2v", {"dit": dit, "text_encoder": text_encoder, "vae": vae})
        spec = attention_spec(attention, sla_topk)
        check_linears_option(linears)
        text, vae_model = _load_common(text_encoder, vae, keep_text_encoder, progress)
        model = load_dit(dit, attention=spec, linears=linears, progress=progress)
        return cls({"high": model}, vae_model, text, offload=offload, progress=progress, verbose=verbose)

    @classmethod
    def tiny(cls, seed: int = 0, *, attention="dense", sla_topk: float = 0.1, keep_text_encoder: bool = False,
             offload: bool = False, progress: bool = False, verbose: bool = True) -> T2VPipeline:
        """The embedded smoke-test preset (random weights from `seed`; see tiny.py); sizes default to "tiny"."""
        spec = attention_spec(attention, sla_topk)
        text = TextStage(lambda: tiny.tiny_text_encoder(seed), keep=keep_text_encoder)
        return cls({"high": tiny.tiny_dit(seed, attention=spec)}, tiny.tiny_vae(seed), text, offload=offload,
                   defaults={"resolution": "tiny"}, progress=progress, verbose=verbose)


class I2VPipeline(_Pipeline):
    """Wan2.2 I2V-A14B: pipe(prompt, image, **options) -> Video. Options (I2V_DEFAULTS): those of T2VPipeline
    (sigma_max 200, resolution 720p), adaptive_resolution (keep the image's aspect ratio at the table entry's
    area), mode "sde" | "ode", boundary (RF time of the switch to the low-noise expert, 0.9). offload: None decides
    per generation whether both experts fit on the device; True keeps only the running one there."""

    kind = "i2v"

    def __call__(self, prompt: str, image: str | Path | None = None, **options) -> Video:
        return self._generate(self.plan(prompt, image, **options))

    @classmethod
    def load(cls, high: str | Path, low: str | Path, text_encoder: str | Path, vae: str | Path, *,
             attention="dense", sla_topk: float = 0.1, linears: str | None = None, keep_text_encoder: bool = False,
             offload: bool | None = None, progress: bool = True, verbose: bool = True) -> I2VPipeline:
        """From converted folders (linears as T2VPipeline.load). Both experts load into host memory first; the first
        generation moves them to the device as the memory plan says (experts.py)."""
        check_folders("i2v", {"high": high, "low": low, "text_encoder": text_encoder, "vae": vae})
        spec = attention_spec(attention, sla_topk)
        check_linears_option(linears)
        text, vae_model = _load_common(text_encoder, vae, keep_text_encoder, progress)
        with jax.default_device(jax.devices("cpu")[0]):
            experts = {name: load_dit(path, attention=spec, linears=linears, progress=progress)
                       for name, path in (("high", high), ("low", low))}
        return cls(experts, vae_model, text, offload=offload, progress=progress, verbose=verbose)

    @classmethod
    def tiny(cls, seed: int = 0, *, attention="dense", sla_topk: float = 0.1, keep_text_encoder: bool = False,
             offload: bool | None = None, progress: bool = False, verbose: bool = True) -> I2VPipeline:
        """The embedded smoke-test preset with two random experts; sizes default to "tiny"."""
        spec = attention_spec(attention, sla_topk)
        text = TextStage(lambda: tiny.tiny_text_encoder(seed), keep=keep_text_encoder)
        experts = {name: tiny.tiny_dit(seed, name, i2v=True, attention=spec) for name in ("high", "low")}
        return cls(experts, tiny.tiny_vae(seed), text, offload=offload, defaults={"resolution": "tiny"},
                   progress=progress, verbose=verbose)
