"""`turbojax bench` (also `python -m turbojax.bench`): the performance harness, every part of every preset in one run.

    turbojax bench --preset 1.3b-480p --json out/bench.json --markdown out/bench.md       # everything, on a GPU
    turbojax bench --preset 14b-720p --parts sampler --attention sla --linears w8a8 --iters 2
    turbojax bench --preset tiny --json out/tiny.json                                    # CPU smoke run
    turbojax bench --merge out/bench.json out/14b.json --markdown out/all.md   # one report of split runs

Presets (parts.PRESETS; random weights at the real shapes, 81 frames, 16:9): 1.3b-480p, 14b-480p, 14b-720p,
a14b-i2v-720p (two experts, sigma_max 200, the image condition), and the CPU smoke presets tiny and tiny-i2v.

Parts, one row each per preset (the DiT parts once per --attention x --linears variant):
- dit: one DiT forward (the first rCM step's timestep), compiled ahead: median/min ms, compile s, XLA's planned
  device bytes for the call.
- sampler: the whole 4-step rCM sampler as one jitted program (A14B: both experts on the device, the switch
  inside): median/min ms of a call, first call s (trace + compile + run).
- text: umT5-XXL encode of one prompt (tokeniser included; no ftfy needed). vae: VAE decode of the latents to 81
  frames; I2V presets add the image encode (vae-encode). mp4: write_mp4 of 81 frames at the preset's size. Each:
  median/min ms of a call, first call s.
- pipeline: T2V/I2V pipeline end to end from in-memory random models (parts.measure_pipeline): the first call as a
  one-shot `turbojax generate` (text encoder freed after the prompt; its device peak is extra.generate_peak_bytes),
  then warm calls with the encoder kept (`turbojax serve`): stages = median seconds per stage, median_ms = total.
- compile-cache: the first generation in a fresh process, twice, with JAX's persistent compilation cache in a new
  folder: cold cache (first_call_s), then warm (extra.warm_first_call_s), per-stage seconds for both.

A variant that does not exist here (e.g. an attention kernel the device lacks; mp4 without imageio-ffmpeg) is a row
with status "unavailable" and the reason; one that does not fit, status "oom"; any other failure, "error" with the
exception (and extra.traceback); a worker past --timeout, "timeout". Rows print as they complete and the JSON and
markdown files are rewritten after each, so an interrupted run keeps what it measured.

Peak device memory: JAX cannot reset a device's peak_bytes_in_use, so with isolation (the default for the real
presets) every row runs in its own fresh process and peak_bytes is that row's own (models, compilation and the
measured calls; peak_scope "row"); build_peak_bytes is the peak once its models were built, before measuring. The
worker processes get XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless it is set (A14B keeps 2 x 28.6 GB of experts on the
device for the sampler). Without isolation (the tiny presets; --isolate none) rows run in this process and
peak_bytes is the process's peak so far (peak_scope "process"). CPUs keep no memory statistics: null.

JSON: {"rows": [row, ...], "goals": [goal, ...]}. A row (ROW_FIELDS; null where a field does not apply):
  preset, part, attention, linears   what ran (attention/linears: the DiT parts only)
  status, reason                     "ok" | "unavailable" | "oom" | "error" | "timeout", and why not ok
  what, device, frames, iters        what was timed, on which device, how many frames, timed calls
  median_ms, min_ms                  the timed calls (pipeline: the warm calls' total)
  compile_s                          lowering + compilation of the program compiled ahead (dit)
  first_call_s                       a first call: tracing + compilation + one run (the other parts;
                                     compile-cache: with a cold cache)
  program_bytes                      dit: XLA's planned bytes for one call (arguments + temporaries + outputs -
                                     aliases)
  peak_bytes, peak_scope             the device's peak bytes in use, and over what ("row" or "process")
  build_peak_bytes                   that peak once the row's models were built
  stages                             pipeline and compile-cache: seconds per stage (text_load, text_encode,
                                     image_encode, diffusion, vae_decode, write)
  extra                              part-specific: tokens and shapes, generate_peak_bytes, offload, cache entries, ...
A goal (GOALS): goal, target, unit, value, row (preset/part/attention/linears of the best row), ratio
(value / target), met, caveat (what the value leaves out, e.g. the mp4 write where imageio-ffmpeg is missing: then
a lower bound, and met is null while it stays under the target); value null when no row measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from turbojax.bench import parts

PART_NAMES = ("dit", "sampler", "text", "vae", "mp4", "pipeline", "compile-cache")
DIT_PARTS = ("dit", "sampler", "pipeline", "compile-cache")
ATTENTIONS = ("dense", "sla", "sagesla")
LINEARS = ("float", "w8a8")
STATUSES = ("ok", "unavailable", "oom", "error", "timeout")
ROW_FIELDS = ("preset", "part", "attention", "linears", "status", "reason", "what", "device", "frames", "iters",
              "median_ms", "min_ms", "compile_s", "first_call_s", "program_bytes", "peak_bytes", "peak_scope",
              "build_peak_bytes", "stages", "extra")
TINY_PRESETS = ("tiny", "tiny-i2v")
GB = 1e9
ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding the turbojax package


# ---------------------------------------------------------------------------------------------------------------
# Tasks and rows
# ---------------------------------------------------------------------------------------------------------------


def plan(presets: list[str], part_names: list[str], attentions: list[str], linears: list[str],
         frames: int | None, iters: int, sla_topk: float, offload: bool = False) -> list[dict]:
    """The tasks of a run in order: per preset, per part, the DiT parts per linears and attention; "vae" is the
    decode and, for I2V presets, the image encode. offload goes to the pipelines the pipeline parts build."""
    tasks = []
    for name in presets:
        base = {"preset": name, "frames": frames, "iters": iters, "sla_topk": sla_topk, "offload": offload}
        for part in part_names:
            if part in DIT_PARTS:
                tasks += [{**base, "part": part, "attention": a, "linears": lin} for lin in linears
                          for a in attentions]
            elif part == "vae":
                tasks += [{**base, "part": p, "attention": None, "linears": None}
                          for p in ("vae-decode", "vae-encode") if p == "vae-decode" or parts.PRESETS[name].i2v]
            else:
                tasks.append({**base, "part": part, "attention": None, "linears": None})
    return tasks


def make_row(task: dict, **fields) -> dict:
    """A row of ROW_FIELDS: the task's identity, then the given fields, everything else null."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update({k: task.get(k) for k in ("preset", "part", "attention", "linears", "frames", "iters")})
    row["frames"] = row["frames"] or parts.PRESETS[task["preset"]].frames
    row.update(fields)
    row["extra"] = row["extra"] or {}
    return row


def unavailable_reason(task: dict) -> str | None:
    """Why a task's variant does not exist here, checked without touching a device: an attention kind turbojax
    lacks (the pipelines' own check), or mp4 writing without imageio-ffmpeg."""
    from turbojax.pipelines.pipeline import attention_spec

    if task["attention"] is not None:
        try:
            attention_spec(task["attention"], task["sla_topk"])
        except ValueError as e:
            return str(e)
    if task["part"] == "mp4":
        return parts.ffmpeg_reason()
    return None


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_worker(task: dict, timeout: float | None) -> dict:
    """The task in a fresh `python -m turbojax.bench.parts` process: its row's fields (status timeout or error with
    the worker's last stderr lines when it printed none)."""
    cmd = [sys.executable, "-m", "turbojax.bench.parts", json.dumps(task)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:g} s (--timeout); the worker was killed"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(parts.ROW_MARK):
            return json.loads(line[len(parts.ROW_MARK):])
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-12:]
    status = "oom" if parts.is_oom(proc.stderr) else "error"
    return {"status": status, "reason": f"the worker exited with status {proc.returncode} and no result: "
                                        f"{tail[-1] if tail else 'no output'}", "extra": {"stderr": tail}}


def run_compile_cache(task: dict, timeout: float | None) -> dict:
    """Two fresh processes, each timing the first generation, sharing a new persistent-cache folder: cold, then
    warm. Fields of the compile-cache row."""
    cache = Path(tempfile.mkdtemp(prefix="turbojax-bench-cache-"))
    try:
        first = {**task, "part": "first-generation", "cache_dir": str(cache)}
        cold = run_worker(first, timeout)
        entries = sum(1 for p in cache.rglob("*") if p.is_file())
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        warm = run_worker(first, timeout) if cold["status"] == "ok" else None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if warm is None or warm["status"] != "ok":
        failed = warm or cold
        return {k: failed.get(k) for k in ("status", "reason", "device", "extra")}
    return {"status": "ok", "what": "first generation in a fresh process: cold, then warm persistent compilation cache",
            "device": cold["device"], "first_call_s": cold["first_call_s"], "stages": cold["stages"],
            "peak_bytes": cold["peak_bytes"], "peak_scope": "row" if cold["peak_bytes"] is not None else None,
            "build_peak_bytes": cold["build_peak_bytes"],
            "extra": {"warm_first_call_s": warm["first_call_s"], "warm_stages": warm["stages"],
                      "warm_peak_bytes": warm["peak_bytes"], "cache_entries": entries, "cache_bytes": cache_bytes}}


def run_task(task: dict, isolate: bool, timeout: float | None) -> dict:
    """One task -> one complete row."""
    reason = unavailable_reason(task)
    if reason:
        return make_row(task, status="unavailable", reason=reason)
    if task["part"] == "compile-cache":
        return make_row(task, **run_compile_cache(task, timeout))
    if isolate:
        fields = run_worker(task, timeout)
        return make_row(task, **fields, peak_scope="row" if fields.get("peak_bytes") is not None else None)
    fields = parts.measure(task)
    return make_row(task, **fields, peak_scope="process" if fields.get("peak_bytes") is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Goals of the performance issue
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Goal:
    """A target of the performance issue, met by the lowest value of the ok rows of preset/part (and linears).
    caveat names what a row's value leaves out (a lower bound then): such rows count only when no complete one
    exists, and meet the goal only if complete."""

    goal: str
    preset: str
    part: str
    target: float
    unit: str
    value: Callable[[dict], float | None]
    linears: str | None = None
    caveat: Callable[[dict], str | None] = lambda row: None


def _seconds(row: dict) -> float:
    return row["median_ms"] / 1e3


def _generate_peak_gb(row: dict) -> float | None:
    peak = row["extra"].get("generate_peak_bytes")
    return None if peak is None or row["peak_scope"] != "row" else peak / GB


def _without_mp4(row: dict) -> str | None:
    return None if "write" in row["stages"] else "without the mp4 write (imageio-ffmpeg not installed): a lower bound"


GOALS = (
    Goal("diffusion only, 1.3B-480p (4-step sampler)", "1.3b-480p", "sampler", 0.45, "s", _seconds),
    Goal("diffusion only, 14B-720p (4-step sampler)", "14b-720p", "sampler", 8.0, "s", _seconds),
    Goal("diffusion only, A14B-I2V-720p (4-step sampler, expert switch)", "a14b-i2v-720p", "sampler", 9.0, "s",
         _seconds),
    Goal("end to end, 1.3B-480p (T5 + DiT + VAE + mp4, warm)", "1.3b-480p", "pipeline", 1.5, "s", _seconds,
         caveat=_without_mp4),
    Goal("14B-720p W8A8 pipeline, peak device memory (turbojax generate)", "14b-720p", "pipeline", 24.0, "GB",
         _generate_peak_gb, linears="w8a8"),
)


def goals(rows: list[dict]) -> list[dict]:
    """Each goal with the best row that measured it: value, ratio to the target, met (None: a lower bound still
    under the target), the row, and the caveat of a lower bound."""
    out = []
    for g in GOALS:
        candidates = [(g.value(r), g.caveat(r), r) for r in rows if r["status"] == "ok" and r["preset"] == g.preset
                      and r["part"] == g.part and (g.linears is None or r["linears"] == g.linears)]
        candidates = [c for c in candidates if c[0] is not None]
        complete = [c for c in candidates if c[1] is None]
        entry = {"goal": g.goal, "target": g.target, "unit": g.unit, "value": None, "row": None, "ratio": None,
                 "met": None, "caveat": None}
        if candidates:
            value, caveat, row = min(complete or candidates, key=lambda c: c[0])
            met = value <= g.target if caveat is None else (False if value > g.target else None)
            entry.update(value=value, ratio=value / g.target, met=met, caveat=caveat,
                         row={k: row[k] for k in ("preset", "part", "attention", "linears")})
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def notes(row: dict) -> str:
    """The markdown notes of a row: why it is not ok, or what the part adds (stages, cache, shapes)."""
    if row["status"] != "ok":
        return row["reason"] or ""
    extra, out = row["extra"], []
    if row["part"] == "pipeline":
        out.append(", ".join(f"{k} {v:.3f} s" for k, v in row["stages"].items()))
        if extra.get("generate_peak_bytes") is not None:
            out.append(f"generate peak {_gb(extra['generate_peak_bytes'])} GB")
        if extra.get("offload"):
            out.append("offload (the DiT on the device for the steps only)")
    elif row["part"] == "compile-cache":
        cold, warm = row["first_call_s"], extra["warm_first_call_s"]
        out.append(f"first generation: cold cache {cold:.1f} s, warm cache {warm:.1f} s ({cold / warm:.1f}x); "
                   f"{extra['cache_entries']} cache files, {extra['cache_bytes'] / 1e6:.0f} MB")
    elif "tokens" in extra:
        out.append(f"{extra['tokens']:,} tokens")
    if row["program_bytes"] is not None:
        out.append(f"program {_gb(row['program_bytes'])} GB")
    if row["peak_bytes"] is not None and row["peak_bytes"] == row["build_peak_bytes"]:
        out.append("peak set while building the models")
    if extra.get("finite") is False:
        out.append("output not finite (random weights)")
    return "; ".join(out)


def markdown(rows: list[dict], goal_rows: list[dict]) -> str:
    devices = sorted({r["device"] for r in rows if r["device"]})
    lines = [f"device: {', '.join(devices) or 'not reached'}; GB = 1e9 bytes; peak = the device's peak bytes in use "
             "(per row when isolated, else of the process so far)", "",
             "| preset | part | attention | linears | status | median ms | min ms | compile s | first call s | "
             "peak GB | notes |", "|" + "---|" * 11]
    for r in rows:
        peak = _gb(r["peak_bytes"]) + (" (process)" if r["peak_scope"] == "process" else "")
        lines.append(f"| {r['preset']} | {r['part']} | {r['attention'] or '-'} | {r['linears'] or '-'} | "
                     f"{r['status']} | {_num(r['median_ms'], '.1f')} | {_num(r['min_ms'], '.1f')} | "
                     f"{_num(r['compile_s'], '.1f')} | {_num(r['first_call_s'], '.2f')} | {peak} | "
                     f"{notes(r).replace('|', '/')} |")
    lines += ["", "| goal | target | best measured | variant | vs target | met |", "|---|---|---|---|---|---|"]
    for g in goal_rows:
        if g["value"] is None:
            lines.append(f"| {g['goal']} | {g['target']:g} {g['unit']} | not measured | - | - | - |")
            continue
        variant = f"{g['row']['attention']}, {g['row']['linears']}"
        met = {True: "yes", False: "no", None: "not known"}[g["met"]]
        value = f"{g['value']:.3f} {g['unit']}" + (f" ({g['caveat']})" if g["caveat"] else "")
        lines.append(f"| {g['goal']} | {g['target']:g} {g['unit']} | {value} | {variant} | {g['ratio']:.2f}x | "
                     f"{met} |")
    return "\n".join(lines) + "\n"


def summary_line(row: dict) -> str:
    """One printed line per completed row."""
    variant = f" {row['attention']}/{row['linears']}" if row["attention"] else ""
    head = f"[{row['preset']}] {row['part']}{variant}: {row['status']}"
    if row["status"] != "ok":
        return f"{head}: {row['reason']}"
    parts_ = [f"median {row['median_ms']:.1f} ms" if row["median_ms"] is not None else None,
              f"compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else None,
              f"first call {row['first_call_s']:.2f} s" if row["first_call_s"] is not None else None,
              f"peak {_gb(row['peak_bytes'])} GB" if row["peak_bytes"] is not None else None]
    return f"{head}, " + ", ".join(p for p in parts_ if p)


def _write(path: str | None, text: str) -> None:
    """Writes text to path atomically (a reader never sees half a file)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(rows: list[dict], json_path: str | None, markdown_path: str | None) -> list[dict]:
    goal_rows = goals(rows)
    _write(json_path, json.dumps({"rows": rows, "goals": goal_rows}, indent=2) + "\n")
    _write(markdown_path, markdown(rows, goal_rows))
    return goal_rows


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", nargs="+", default=["1.3b-480p"], choices=list(parts.PRESETS),
                   help="benchmark presets (default 1.3b-480p); tiny and tiny-i2v are CPU smoke runs")
    p.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS,
                   help="self-attention variants of the DiT parts (default all)")
    p.add_argument("--linears", nargs="+", default=list(LINEARS), choices=LINEARS,
                   help="block Linears of the DiT parts: bf16 or W8A8 int8 (default both)")
    p.add_argument("--parts", nargs="+", default=list(PART_NAMES), choices=PART_NAMES,
                   help="what to measure (default all)")
    p.add_argument("--iters", type=int, default=3, help="timed calls after the first (default 3)")
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the preset's, 81; tiny 1)")
    p.add_argument("--sla-topk", type=float, default=0.1, help="SLA's kept key-block share (default 0.1)")
    p.add_argument("--offload", action="store_true",
                   help="pipelines keep the DiT in host memory, on the device for the steps only (--offload)")
    p.add_argument("--isolate", default="auto", choices=["auto", "subprocess", "none"],
                   help="one fresh process per row, for per-row peak memory (auto: yes unless only tiny presets)")
    p.add_argument("--timeout", type=float, help="seconds a row's process may run before it is killed")
    p.add_argument("--json", help="write the rows and goals here (rewritten after each row)")
    p.add_argument("--markdown", help="write the markdown tables here (rewritten after each row)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: the rows of these earlier --json files (a run split over several "
                        "commands) as one report, goals included")


def check_arguments(args: argparse.Namespace) -> None:
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        raise ValueError(f"--frames must be 4k+1 (e.g. 81, 17, 5), got {args.frames}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be positive seconds, got {args.timeout}")


def merged_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier --json reports, in order."""
    rows = []
    for path in paths:
        try:
            rows += json.loads(Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--merge {path}: not a turbojax bench --json report ({type(e).__name__}: {e})") from None
    return rows


def run(args: argparse.Namespace) -> int:
    """Runs the planned rows (or merges earlier reports), printing each row and rewriting the reports; 1 if any row
    errored or timed out."""
    check_arguments(args)
    if args.merge:
        rows = merged_rows(args.merge)
        goal_rows = write_reports(rows, args.json, args.markdown)
    else:
        isolate = args.isolate == "subprocess" or (args.isolate == "auto"
                                                   and not set(args.preset) <= set(TINY_PRESETS))
        tasks = plan(args.preset, args.parts, args.attention, args.linears, args.frames, args.iters, args.sla_topk,
                     args.offload)
        print(f"turbojax bench: {len(tasks)} rows, {'one process each' if isolate else 'in this process'}",
              flush=True)
        rows: list[dict] = []
        goal_rows = goals(rows)
        for task in tasks:
            rows.append(run_task(task, isolate, args.timeout))
            print(summary_line(rows[-1]), flush=True)
            goal_rows = write_reports(rows, args.json, args.markdown)
    print("\n" + markdown(rows, goal_rows), end="")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 1 if counts["error"] or counts["timeout"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="turbojax bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
