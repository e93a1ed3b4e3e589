"""Where the GPU time of the jitted rCM sampler goes: a jax.profiler trace, its kernels in four classes.

    python -m turbojax.bench.profile --preset wan2.1-t2v-1.3b --res 480p --steps 4 --json out/profile.json
    python -m turbojax.bench.profile --trace TRACE_DIR/plugins/profile/RUN/perfetto_trace.json.gz   # classify only

Builds the preset's DiT with random weights (bench.parts.build_dit; an I2V preset gets both experts and the image
condition), compiles the whole sampler and runs it once, then traces --runs calls with
`jax.profiler.trace(dir, create_perfetto_trace=True)`. The perfetto_trace.json.gz it writes is Chrome trace JSON:
the GPU is a process named "/device:GPU:N" whose "Stream #..." threads hold one complete event per kernel (name,
duration in us); its other threads ("XLA Ops", "XLA Modules", "Steps", ...) are derived from the streams and would
count every kernel twice, so only the stream threads are read (KERNEL_THREAD). Each kernel is classified by name
(classify): attention, linears, elementwise (XLA fusions and the norm kernels) or other, and the tool prints and
writes ms per sampler call and % of the kernel time per class, and the top kernels.

On a CPU the trace holds only host events (XLA:CPU runs no device kernels): the tool says so and exits with
status 1 rather than print zeros.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ("attention", "linears", "elementwise", "other")
# Substrings of lowercased kernel names, tried in this order; the first class with a match wins.
RULES = (
    ("other", ("memcpy", "memset")),
    # cuDNN fused attention (cudnn_generated_fort_native_sdpa_..., fmha_...), flash kernels, our SLA/SageSLA kernels.
    ("attention", ("sdpa", "fmha", "flash", "attention", "sla_sparse", "sla_linear", "sagesla")),
    # cuBLAS/cuBLASLt (sm90_xmma_gemm_..., nvjet_..., cutlass_80_wmma_tensorop_...), XLA's Triton GEMM fusions, our
    # W8A8 quantiser and int8 GEMM (w8a8_quantize, w8a8_block_gemm).
    ("linears", ("gemm", "gemv", "cublas", "cutlass", "xmma", "wmma", "nvjet", "matmul", "w8a8", "int8")),
    # XLA's generated kernels (loop_/input_ fusions, converts, copies, reductions, its Triton softmax fusions) and our
    # fused norm kernels (layer_norm_*, rms_norm*).
    ("elementwise", ("fusion", "norm", "convert", "copy", "transpose", "broadcast", "reduce", "slice", "concatenate",
                     "select", "iota", "pad", "triton", "multiply", "add", "subtract", "divide", "exponential",
                     "negate", "rsqrt", "tanh", "erf", "compare", "maximum", "minimum", "dynamic")),
)
# Mosaic GPU kernels are named after the kernel body's Python function ("entry" -> entry_mosaic_gpu_kernel), which
# may not say what they compute: then the event's HLO op arguments decide (MOSAIC_HINTS), else the caller's default.
MOSAIC = "mosaic"
MOSAIC_HINTS = (("attention", ("sla", "attention")), ("linears", ("int8", "w8a8", "gemm", "matmul")))
HINT_ARGS = ("hlo_op", "tf_op", "long_name", "name_scope")
GPU_PROCESS = re.compile(r"/device:GPU", re.IGNORECASE)
KERNEL_THREAD = re.compile(r"^Stream\b", re.IGNORECASE)
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope", "TensorFlow Ops",
                 "TensorFlow Name Scope", "Source code", "XLA TraceMe", "Launch Stats")
TOP = 15


class NoKernelEvents(ValueError):
    """The trace holds no GPU kernel events: nothing to classify."""


def classify(name: str, hint: str = "", mosaic_class: str = "other") -> str:
    """The class of a kernel (CLASSES) from its name; generic Mosaic GPU names from hint (the event's HLO op
    arguments) or mosaic_class."""
    lowered = name.lower()
    for cls, keys in RULES:
        if any(k in lowered for k in keys):
            return cls
    if MOSAIC in lowered:
        hint = hint.lower()
        for cls, keys in MOSAIC_HINTS:
            if any(k in hint for k in keys):
                return cls
        return mosaic_class
    return "other"


def read_trace(path: str | Path) -> list[dict]:
    """The events of a Chrome/perfetto trace file (.json or .json.gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kernel_events(events: list[dict]) -> tuple[list[dict], list[str]]:
    """The GPU kernel events [{name, dur (us), hint}] of a trace and the names of the threads they came from.
    Raises NoKernelEvents, naming the processes the trace does hold, when it has none."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpus = {pid for pid, name in processes.items() if GPU_PROCESS.search(name)}
    streams = {key for key, name in threads.items() if key[0] in gpus and KERNEL_THREAD.search(name)}
    with_streams = {pid for pid, _ in streams}

    def is_kernel(e: dict) -> bool:
        """A complete event on a GPU's stream thread (or, where a GPU names no streams, on any thread but the
        derived ones)."""
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") != "X" or key[0] not in gpus:
            return False
        if key[0] in with_streams:
            return key in streams
        return threads.get(key, "") not in DERIVED_LINES

    kernels = [{"name": e["name"], "dur": float(e.get("dur", 0.0)),
                "hint": " ".join(str(e.get("args", {}).get(k, "")) for k in HINT_ARGS)}
               for e in events if is_kernel(e)]
    if not kernels:
        counts = collections.Counter(processes.get(e.get("pid"), f"pid {e.get('pid')}") for e in events
                                     if e.get("ph") == "X")
        seen = ", ".join(f"{name} ({n} events)" for name, n in counts.items()) or "no events"
        where = "its GPU processes have no kernel events" if gpus else "it has no GPU process (/device:GPU:N)"
        raise NoKernelEvents(f"the trace holds no GPU kernel events: {where}; it holds {seen}. XLA:CPU runs no "
                             "device kernels, so there is nothing to classify: profile on a GPU")
    return kernels, sorted({threads.get((e["pid"], e["tid"]), str(e["tid"])) for e in events if is_kernel(e)})


def summarize(kernels: list[dict], runs: int = 1, mosaic_class: str = "other", top: int = TOP) -> dict:
    """Per class and per kernel name: ms per run (the trace's total / runs), % of the kernel time, launches per run."""
    by_name: dict[str, dict] = {}
    for k in kernels:
        entry = by_name.setdefault(k["name"], {"name": k["name"], "us": 0.0, "count": 0,
                                               "class": classify(k["name"], k["hint"], mosaic_class)})
        entry["us"] += k["dur"]
        entry["count"] += 1
    total_us = sum(e["us"] for e in by_name.values())

    def figures(us: float, count: int) -> dict:
        return {"ms": us / 1e3 / runs, "percent": 100.0 * us / total_us if total_us else 0.0,
                "launches": count / runs}

    classes = {}
    for c in CLASSES:
        members = [e for e in by_name.values() if e["class"] == c]
        classes[c] = figures(sum(e["us"] for e in members), sum(e["count"] for e in members))
    ranked = sorted(by_name.values(), key=lambda e: -e["us"])[:top]
    generic = [e for e in by_name.values() if e["class"] == "other" and MOSAIC in e["name"].lower()]
    return {"kernel_ms": total_us / 1e3 / runs, "classes": classes,
            "top": [{"name": e["name"], "class": e["class"], **figures(e["us"], e["count"])} for e in ranked],
            "unnamed_mosaic_ms": sum(e["us"] for e in generic) / 1e3 / runs}


def markdown(summary: dict) -> str:
    lines = ["| class | ms per call | % of kernel time | launches per call |", "|---|---|---|---|"]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {c['ms']:.1f} | {c['percent']:.1f} | {c['launches']:g} |")
    lines.append(f"| all kernels | {summary['kernel_ms']:.1f} | 100.0 | |")
    if summary["unnamed_mosaic_ms"]:
        lines.append(f"\n{summary['unnamed_mosaic_ms']:.1f} ms per call in Mosaic GPU kernels whose names do not say "
                     "what they compute (counted as other): give them a kernel_name to classify them")
    if summary.get("wall_ms"):
        lines.append(f"\nwall time per call: {summary['wall_ms']:.1f} ms (kernels busy "
                     f"{100 * summary['kernel_ms'] / summary['wall_ms']:.0f}% of it)")
    lines += ["", f"top {len(summary['top'])} kernels:", "", "| kernel | class | ms per call | % | launches per call |",
              "|---|---|---|---|---|"]
    for e in summary["top"]:
        name = e["name"] if len(e["name"]) <= 100 else e["name"][:97] + "..."
        lines.append(f"| `{name}` | {e['class']} | {e['ms']:.2f} | {e['percent']:.1f} | {e['launches']:g} |")
    return "\n".join(lines)


def newest_trace(folder: Path) -> Path:
    found = sorted(folder.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
    return found[-1]


def trace_sampler(preset: str, res: str, frames: int, steps: int, attention: str, linears: str, folder: Path,
                  runs: int) -> tuple[Path, list[float], str]:
    """Traces runs calls of the compiled sampler: (the perfetto trace, wall ms of each call, the device)."""
    import jax

    from turbojax.bench import parts
    from turbojax.bench.dit_forward import forward_inputs
    from turbojax.models.config import get_preset
    from turbojax.pipelines.pipeline import attention_spec
    from turbojax.sampling import RCMSampler, RCMSchedule

    bench = parts.BenchPreset(f"{preset}-{res}", preset, res, frames, i2v=get_preset(preset).cond_dim > 0)
    spec = attention_spec(attention)
    schedule = RCMSchedule(num_steps=steps, sigma_max=bench.sigma_max)
    sampler = RCMSampler(*(parts.build_dit(bench, spec, linears, e) for e in bench.experts), schedule=schedule)
    shape = bench.latent_shape(frames)
    inputs = forward_inputs(bench.cfg, shape)
    jax.block_until_ready(sampler(inputs[2], *inputs[3:], latent_shape=shape, seed=0))  # compile outside the trace
    walls = []
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        for i in range(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(sampler(inputs[2], *inputs[3:], latent_shape=shape, seed=i + 1))
            walls.append(1e3 * (time.perf_counter() - t0))
    device = jax.devices()[0]
    return newest_trace(folder), walls, f"{device.platform}: {device.device_kind}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="DiT preset (tiny: a CPU smoke run)")
    p.add_argument("--res", help="480p or 720p (tiny: tiny; default 480p)")
    p.add_argument("--frames", type=int, help="pixel frames (default 81; tiny 1)")
    p.add_argument("--steps", type=int, default=4, help="rCM steps (default 4)")
    p.add_argument("--attention", default="sla", choices=["dense", "sla", "sagesla"])
    p.add_argument("--linears", default="float", choices=["float", "w8a8"],
                   help="block Linears (with --trace: those the traced DiT ran, which tells a float DiT's Mosaic GPU "
                        "kernels as SLA's)")
    p.add_argument("--runs", type=int, default=1, help="sampler calls traced; figures are per call")
    p.add_argument("--dir", help="trace folder (default: a new one under the temporary directory, kept)")
    p.add_argument("--trace", help="classify this perfetto_trace.json.gz instead of running the sampler")
    p.add_argument("--top", type=int, default=TOP, help=f"kernels listed (default {TOP})")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")

    tiny = args.preset == "tiny"
    config = {"preset": args.preset, "res": args.res or ("tiny" if tiny else "480p"),
              "frames": args.frames or (1 if tiny else 81), "steps": args.steps, "attention": args.attention,
              "linears": args.linears, "runs": args.runs}
    walls, device = [], None
    if args.trace:
        trace, config = Path(args.trace), {"runs": args.runs, "linears": args.linears}
    else:
        folder = Path(args.dir or tempfile.mkdtemp(prefix="turbojax-profile-"))
        try:
            trace, walls, device = trace_sampler(config["preset"], config["res"], config["frames"], args.steps,
                                                 args.attention, args.linears, folder, args.runs)
        except ValueError as e:
            p.error(str(e))
        print(f"device {device}; trace: {trace}")
    # In a float DiT the only Mosaic GPU kernel is SLA's sparse kernel; with W8A8 it may be the int8 GEMM too.
    mosaic_class = "attention" if config["linears"] == "float" else "other"
    try:
        kernels, streams = kernel_events(read_trace(trace))
    except NoKernelEvents as e:
        print(f"turbojax.bench.profile: {e}", file=sys.stderr)
        return 1
    summary = {**config, "device": device, "trace": str(trace), "streams": streams,
               "wall_ms": sum(walls) / len(walls) if walls else None,
               **summarize(kernels, args.runs, mosaic_class, args.top)}
    print(markdown(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
