"""The `turbojax` command line: `turbojax generate` (a prompt, or a prompt and an image, to an mp4) and `turbojax
serve` (an interactive session that keeps the models loaded). Without checkpoints both run the embedded `tiny`
preset, a smoke test with random weights. `turbojax bench` is the performance harness (turbojax/bench/harness.py)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Callable, TextIO

from turbojax.checkpoint import CheckpointFormatError

SMOKE_NOTE = ("no checkpoints given: running the embedded `tiny` preset with random weights. The output is a smoke "
              "test of the pipeline, not a video of anything.")
SMOKE_PROMPT = "A smoke test of the turbojax pipeline."
ERRORS = (ValueError, CheckpointFormatError, OSError)

# Generation flags (argparse dest) -> pipeline options. argparse defaults are None: unset flags take the pipeline's
# defaults (T2V_DEFAULTS / I2V_DEFAULTS; resolution "tiny" for the tiny preset).
OPTION_FLAGS = {"frames": "num_frames", "resolution": "resolution", "aspect_ratio": "aspect_ratio",
                "steps": "num_steps", "sigma_max": "sigma_max", "seed": "seed", "samples": "num_samples"}
I2V_FLAGS = {"ode": "--ode", "adaptive_resolution": "--adaptive-resolution"}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models (converted folders, turbojax-convert; none: the tiny smoke test)")
    group.add_argument("--dit", help="DiT folder: Wan2.1 T2V, or the high-noise expert of Wan2.2 I2V-A14B")
    group.add_argument("--low-dit", help="low-noise expert folder of Wan2.2 I2V-A14B")
    group.add_argument("--text-encoder", help="umT5 folder (models_t5_umt5-xxl-enc-bf16.pth converted)")
    group.add_argument("--vae", help="Wan2.1 VAE folder (Wan2.1_VAE.pth converted)")
    group.add_argument("--attention", default="dense", choices=["dense", "sla", "sagesla"],
                       help="self-attention: dense, TurboDiffusion's SLA, or SageSLA (SLA with int8/fp8 kernels)")
    group.add_argument("--sla-topk", type=float, default=0.1, help="SLA's kept key-block share (0.15 recommended)")
    group.add_argument("--sla-blocks", default="128x64", choices=["128x64", "64x128"],
                       help="SLA/SageSLA query x key block sizes: 128x64 (TurboDiffusion's SLA; its SageSLA off "
                            "Hopper) or 64x128 (TurboDiffusion's SageSLA on an H100, which selects other key blocks; "
                            "with --attention sla it runs the slower Triton kernel); dense attention ignores it")
    group.add_argument("--linears", choices=["w8a8", "float"],
                       help="block Linears: w8a8 (TurboDiffusion's --quant_linear; quantises a bf16 folder at load) or "
                            "float (dequantises a -quant folder); default: w8a8 for -quant folders, else float")
    group.add_argument("--offload", action="store_true",
                       help="keep the DiT weights in host memory, on the device only for the steps (the text "
                            "encoder and the VAE decode never share it with them); A14B does this by itself when "
                            "both experts do not fit")


def add_generation_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    group = parser.add_argument_group("generation (defaults: T2V 480p, sigma 80; I2V 720p, sigma 200)")
    group.add_argument("--image", help="input image: image-to-video (needs the A14B experts, or none for tiny)")
    group.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default 81)")
    group.add_argument("--resolution", help="480p or 720p (tiny preset: tiny)")
    group.add_argument("--aspect-ratio", help="W:H, one of 16:9, 9:16, 1:1, 4:3, 3:4 (default 16:9)")
    group.add_argument("--adaptive-resolution", action="store_true",
                       help="I2V: keep the image's aspect ratio at the resolution's area")
    group.add_argument("--steps", type=int, help="rCM steps, 1-4 (default 4)")
    group.add_argument("--sigma-max", type=float, help="initial sigma (T2V 80, I2V 200)")
    group.add_argument("--ode", action="store_true", help="I2V: deterministic ODE steps instead of SDE")
    group.add_argument("--seed", type=int, help="random seed (default 0)")
    group.add_argument("--samples", type=int, help="videos per prompt, side by side in the mp4 (default 1)")
    group.add_argument("--out", default=out_default, help=f"output .mp4 (default {out_default})")


def checkpoint_folders(args: argparse.Namespace) -> dict[str, str | None]:
    return {"--dit": args.dit, "--low-dit": args.low_dit, "--text-encoder": args.text_encoder, "--vae": args.vae}


def model_kind(args: argparse.Namespace) -> str:
    """"i2v" or "t2v": from the DiT folder's config when one is given, else from --image / --low-dit."""
    from turbojax.checkpoint import config_from_meta, read_meta

    if args.dit is not None:
        try:
            cfg = config_from_meta(read_meta(args.dit))
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"--dit: {e}") from None
        return "i2v" if cfg.cond_dim else "t2v"
    return "i2v" if args.image or args.low_dit else "t2v"


def cli_options(args: argparse.Namespace, kind: str) -> dict:
    """The generation options the user set, as pipeline options."""
    opts = {name: getattr(args, flag) for flag, name in OPTION_FLAGS.items() if getattr(args, flag) is not None}
    if kind == "i2v":
        opts["adaptive_resolution"] = args.adaptive_resolution
        opts["mode"] = "ode" if args.ode else "sde"
        return opts
    given = [flag for dest, flag in I2V_FLAGS.items() if getattr(args, dest)]
    if given:
        raise ValueError(f"{', '.join(given)}: image-to-video option(s); pass --image (and the A14B experts)")
    return opts


def mp4_path(out: str) -> Path:
    """--out as an .mp4 path: a path without a suffix gets .mp4; any other suffix is refused."""
    path = Path(out)
    if path.suffix == "":
        return path.with_suffix(".mp4")
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: turbojax writes H.264 mp4; give a path ending in .mp4")
    return path


def attention_option(args: argparse.Namespace):
    """--attention with --sla-topk and --sla-blocks, as the pipelines' AttentionSpec."""
    from turbojax.pipelines.pipeline import attention_spec

    block_q, block_k = (int(n) for n in args.sla_blocks.split("x"))
    return dataclasses.replace(attention_spec(args.attention, args.sla_topk), block_q=block_q, block_k=block_k)


def check_request(args: argparse.Namespace) -> tuple[str, bool, dict]:
    """Everything that can be checked before loading: (kind, smoke test?, pipeline defaults + options)."""
    from turbojax.pipelines.pipeline import check_folders

    folders = checkpoint_folders(args)
    smoke = all(path is None for path in folders.values())
    missing = [flag for flag in ("--dit", "--text-encoder", "--vae") if folders[flag] is None]
    if not smoke and missing:
        raise ValueError(f"missing checkpoint parts: {', '.join(missing)} (converted folders: turbojax-convert)")
    if smoke and args.linears:
        raise ValueError("--linears applies to converted checkpoints (--dit ...); the tiny preset is float")
    kind = model_kind(args)
    attention_option(args)
    if not smoke:
        if kind == "t2v" and args.low_dit:
            raise ValueError("--low-dit is the second expert of Wan2.2 I2V-A14B; --dit is a T2V model")
        check_folders(kind, folders if kind == "i2v" else {k: v for k, v in folders.items() if k != "--low-dit"})
    options = {**({"resolution": "tiny"} if smoke else {}), **cli_options(args, kind)}
    return kind, smoke, options


def load_pipeline(args: argparse.Namespace, kind: str, smoke: bool, *, keep_text_encoder: bool):
    from turbojax.pipelines import I2VPipeline, T2VPipeline

    progress = sys.stderr.isatty()
    common = dict(attention=attention_option(args), keep_text_encoder=keep_text_encoder,
                  progress=progress, verbose=False)
    if kind == "i2v":
        offload = True if args.offload else None
        if smoke:
            return I2VPipeline.tiny(0, offload=offload, **common)
        return I2VPipeline.load(args.dit, args.low_dit, args.text_encoder, args.vae, offload=offload,
                                linears=args.linears, **common)
    if smoke:
        return T2VPipeline.tiny(0, offload=args.offload, **common)
    return T2VPipeline.load(args.dit, args.text_encoder, args.vae, linears=args.linears, offload=args.offload,
                            **common)


def run_once(pipe, prompt: str, image: str | None, options: dict, out: Path, print_fn: Callable = print) -> Path:
    """One generation to `out`, then its timings."""
    from turbojax.pipelines.pipeline import format_timings

    video = pipe(prompt, image=image, **options) if pipe.kind == "i2v" else pipe(prompt, **options)
    path = video.save(out)
    b, t, h, w, _ = video.frames.shape
    experts = f"; experts per step: {', '.join(video.experts)}" if pipe.kind == "i2v" else ""
    print_fn(f"wrote {path}: {b} x {t} frames of {w}x{h} at {video.fps} fps{experts}")
    print_fn(f"timings: {format_timings(video.timings)}")
    return path


def generate(args: argparse.Namespace) -> int:
    from turbojax.pipelines.pipeline import plan

    kind, smoke, options = check_request(args)
    prompt = SMOKE_PROMPT if smoke and args.prompt is None else args.prompt
    if prompt is None:
        raise ValueError("--prompt is required with checkpoints")
    plan(kind, prompt, args.image, **options)  # every option checked before the models load
    out = mp4_path(args.out)
    if smoke:
        print(SMOKE_NOTE)
    pipe = load_pipeline(args, kind, smoke, keep_text_encoder=False)
    run_once(pipe, prompt, args.image, options, out)
    if smoke:
        print(f"{out} is a smoke test: random weights, not a video of anything")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------------------

SETTING_TYPES = {"num_steps": int, "sigma_max": float, "num_frames": int, "resolution": str, "aspect_ratio": str,
                 "seed": int, "num_samples": int, "out": str, "image": str, "adaptive_resolution": "bool",
                 "mode": str, "boundary": float}
I2V_SETTINGS = ("image", "adaptive_resolution", "mode", "boundary")
HELP = """Type a prompt to generate a video with the current settings. Commands:
  /set KEY VALUE   change a setting (/show lists them), e.g. /set num_steps 2, /set image photo.jpg
  /show            the current settings
  /reset           settings back to those the session started with
  /help            this text
  /quit            leave (also Ctrl-D)
`out` may contain {n}, the generation's number (out/serve-{n:03d}.mp4 by default)."""


def _print_error(message: str) -> None:
    sys.stdout.flush()  # keep the error after the output it follows when both go to one terminal or file
    print(message, file=sys.stderr)


def parse_setting(key: str, value: str, kind: str):
    if key not in SETTING_TYPES or (kind == "t2v" and key in I2V_SETTINGS):
        keys = [k for k in SETTING_TYPES if kind == "i2v" or k not in I2V_SETTINGS]
        raise ValueError(f"unknown setting {key!r}; settings: {', '.join(keys)}")
    kind_of = SETTING_TYPES[key]
    if kind_of == "bool":
        if value.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} takes on or off, got {value!r}")
        return value.lower() in ("on", "true", "1", "yes")
    try:
        return kind_of(value)
    except ValueError:
        raise ValueError(f"{key} takes a{'n integer' if kind_of is int else ' number'}, got {value!r}") from None


class Session:
    """The state of `turbojax serve`: a loaded pipeline and the settings (pipeline options plus out and image)."""

    def __init__(self, pipe, settings: dict, print_fn: Callable = print, err_fn: Callable | None = None):
        self.pipe = pipe
        self.initial = dict(settings)
        self.settings = dict(settings)
        self.count = 0
        self.print = print_fn
        self.err = err_fn or _print_error

    def options(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in ("out", "image")}

    def handle(self, line: str) -> bool:
        """Runs one input line; False when the session ends. Errors are reported and the session goes on."""
        from turbojax.pipelines.pipeline import check_options
        from turbojax.video import image_size

        line = line.strip()
        if not line:
            return True
        try:
            if not line.startswith("/"):
                self.count += 1
                out = mp4_path(self.settings["out"].format(n=self.count))
                run_once(self.pipe, line, self.settings.get("image"), self.options(), out, self.print)
                return True
            command, *rest = shlex.split(line)
            if command == "/quit":
                return False
            if command == "/help":
                self.print(HELP)
            elif command == "/show":
                self.print("\n".join(f"  {k} = {v}" for k, v in self.settings.items()))
            elif command == "/reset":
                self.settings = dict(self.initial)
                self.print("settings reset")
            elif command == "/set":
                if len(rest) != 2:
                    raise ValueError("usage: /set KEY VALUE (quote a VALUE with spaces)")
                key, value = rest[0], parse_setting(rest[0], rest[1], self.pipe.kind)
                if key == "image":
                    image_size(value)  # missing or unreadable: refused now, not at the next prompt
                candidate = {**self.settings, key: value}
                check_options(self.pipe.kind, **{k: v for k, v in candidate.items() if k not in ("out", "image")})
                self.settings = candidate
                self.print(f"{key} = {value}")
            else:
                raise ValueError(f"unknown command {command}; /help lists the commands")
        except ERRORS as e:
            self.err(f"error: {e}")
        return True

    def run(self, stdin: TextIO, interactive: bool) -> None:
        """Reads lines until /quit or the end of the input, with a "> " prompt on a terminal."""
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = stdin.readline()
            if not line or not self.handle(line):
                return


def serve(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    from turbojax.video import image_size

    kind, smoke, options = check_request(args)
    if args.image is not None:
        image_size(args.image)
    if smoke:
        print(SMOKE_NOTE)
    pipe = load_pipeline(args, kind, smoke, keep_text_encoder=True)
    settings = {**pipe.defaults, **options, "out": args.out}
    if kind == "i2v":
        settings["image"] = args.image
    what = "image-to-video" if kind == "i2v" else "text-to-video"
    print(f"turbojax serve: {what} models loaded{' (tiny smoke test)' if smoke else ''}. Type a prompt; "
          "/help lists the commands.")
    Session(pipe, settings).run(stdin, interactive=stdin.isatty())
    return 0


def bench(args: argparse.Namespace) -> int:
    from turbojax.bench.harness import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    from turbojax.bench.harness import add_arguments as add_bench_args

    parser = argparse.ArgumentParser(prog="turbojax", description="TurboDiffusion's Wan video diffusion in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one video (T2V, or I2V with --image) as an mp4")
    gen.add_argument("--prompt", help="what the video shows (long English prompts work best)")
    add_model_args(gen)
    add_generation_args(gen, "out/turbojax.mp4")
    gen.set_defaults(func=generate)

    srv = sub.add_parser("serve", help="interactive session: models stay loaded between prompts")
    add_model_args(srv)
    add_generation_args(srv, "out/serve-{n:03d}.mp4")
    srv.set_defaults(func=serve)

    bnc = sub.add_parser("bench", help="performance harness: every part of the presets with random weights, timed "
                                       "(a GPU; --preset tiny on a CPU)")
    add_bench_args(bnc)
    bnc.set_defaults(func=bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ERRORS as e:
        print(f"turbojax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
