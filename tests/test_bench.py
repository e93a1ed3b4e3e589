"""`turbojax bench` (the performance harness) and `turbojax.bench.profile`: the tiny presets through every part,
rows and reports with the documented schema, variants that do not exist or do not fit as rows with a reason, per-row
processes, the persistent-cache part; the profile's kernel classes on a synthetic GPU trace, and its clear refusal
of a CPU trace. The in-process runs use the default device: the CPU here, the GPU on the device machine (which has
no imageio-ffmpeg: the mp4 rows then say so)."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pallas_kernels.int8_matmul import reference as int8_reference
from turbojax.bench import harness, parts, profile
from turbojax.bench.timing import memory_stat
from turbojax.cli import main
from turbojax.pipelines import pipeline as pipeline_module
from turbojax.pipelines import tiny

ROOT = Path(__file__).parent.parent
EVERY_PART_BUT_CACHE = ["dit", "sampler", "text", "vae", "mp4", "pipeline"]
HAS_FFMPEG = parts.ffmpeg_reason() is None


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of the results table's data rows."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| tiny")]


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    """One in-process run of every part but compile-cache on tiny-i2v: both experts, the image encode, the switch."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--preset", "tiny-i2v", "--parts", *EVERY_PART_BUT_CACHE, "--attention", "dense",
                 "--linears", "float", "--iters", "2", "--json", str(out / "b.json"), "--markdown", str(out / "b.md")])
    return code, json.loads((out / "b.json").read_text()), (out / "b.md").read_text()


def test_bench_rows_follow_the_schema(i2v_run):
    code, report, _ = i2v_run
    assert code == 0
    rows = report["rows"]
    assert [r["part"] for r in rows] == ["dit", "sampler", "text", "vae-decode", "vae-encode", "mp4", "pipeline"]
    mp4 = rows[5]
    assert (mp4["status"], mp4["reason"]) == (("ok", None) if HAS_FFMPEG else ("unavailable", parts.MP4_INSTALL))
    stats = memory_stat("peak_bytes_in_use") is not None  # none on the CPU
    for r in rows[:5] + rows[6:]:
        assert list(r) == list(harness.ROW_FIELDS)
        assert r["status"] == "ok" and r["reason"] is None, r
        assert r["preset"] == "tiny-i2v" and r["frames"] == 1 and r["iters"] == 2
        assert r["device"].startswith(jax.devices()[0].platform) and r["what"]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert (r["peak_bytes"] is not None, r["peak_scope"]) == ((True, "process") if stats else (False, None))
        assert (r["attention"], r["linears"]) == (("dense", "float") if r["part"] in harness.DIT_PARTS
                                                  else (None, None))
    dit, sampler, *_, pipe = rows
    assert dit["compile_s"] > 0 and dit["program_bytes"] > 0 and dit["extra"]["finite"]
    assert all(r["first_call_s"] > 0 for r in rows[1:] if r["status"] == "ok")
    assert sampler["extra"]["experts_per_step"] == ["high", "high", "low", "low"]  # sigma_max 200, boundary 0.9
    assert sampler["extra"]["sigma_max"] == 200.0


def test_bench_pipeline_row_has_stages(i2v_run):
    pipe = i2v_run[1]["rows"][-1]
    stages = ["text_load", "text_encode", "image_encode", "diffusion", "vae_decode"] + ["write"] * HAS_FFMPEG
    assert list(pipe["stages"]) == stages and list(pipe["extra"]["first_call_stages"]) == stages
    assert pipe["stages"]["text_load"] == 0  # warm calls keep the encoder (serve), the first loaded it
    assert pipe["extra"]["first_call_stages"]["text_load"] > 0
    assert pipe["median_ms"] == pytest.approx(1e3 * sum(pipe["stages"].values()), rel=1e-6)  # iters 2: the mean
    assert pipe["first_call_s"] == pytest.approx(sum(pipe["extra"]["first_call_stages"].values()))


def test_bench_markdown_has_every_row_and_the_goals(i2v_run):
    _, report, text = i2v_run
    cells = markdown_rows(text)
    assert [(c[1], c[4]) for c in cells] == [(r["part"], r["status"]) for r in report["rows"]]
    assert all(c[5] == harness._num(r["median_ms"], ".1f") for c, r in zip(cells, report["rows"]))
    assert [g["goal"] for g in report["goals"]] == [g.goal for g in harness.GOALS]
    assert all(g["value"] is None for g in report["goals"])  # no real preset ran
    assert "| diffusion only, 1.3B-480p (4-step sampler) | 0.45 s | not measured |" in text


def test_offload_reaches_the_pipeline_rows(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--parts", "pipeline", "--attention", "dense", "--linears", "float",
                 "--iters", "1", "--offload", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["extra"]["offload"] is True
    transfers = [tuple(t) for t in row["extra"]["expert_transfers"]]
    assert transfers[0] == ("high", "host") and transfers[1:] == [("high", "device"), ("high", "host")] * 3
    assert "offload" in harness.notes(row)


def test_missing_variants_are_rows_with_their_reason(tmp_path, monkeypatch, capsys):
    """As on the GPU machine (no imageio-ffmpeg) and before SageSLA existed: rows that say why, not a crash."""
    real_spec = pipeline_module.attention_spec

    def without_sagesla(name, topk=0.1):
        if name == "sagesla":
            raise ValueError("attention 'sagesla' is not available in turbojax yet; use 'sla' or 'dense'")
        return real_spec(name, topk)

    monkeypatch.setattr(pipeline_module, "attention_spec", without_sagesla)
    monkeypatch.setattr(parts, "ffmpeg_reason", lambda: parts.MP4_INSTALL)
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--parts", "dit", "mp4", "--attention", "dense", "sagesla",
                 "--linears", "float", "w8a8", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    got = [(r["part"], r["attention"], r["linears"], r["status"]) for r in rows]
    assert got == [("dit", "dense", "float", "ok"), ("dit", "sagesla", "float", "unavailable"),
                   ("dit", "dense", "w8a8", "ok"), ("dit", "sagesla", "w8a8", "unavailable"),
                   ("mp4", None, None, "unavailable")]
    assert all("not available" in r["reason"] for r in rows if r["attention"] == "sagesla")
    assert rows[-1]["reason"] == "imageio-ffmpeg not installed (pip install imageio-ffmpeg): no mp4 is written"
    assert rows[2]["program_bytes"] != rows[0]["program_bytes"]  # int8 block weights: a different program
    printed = capsys.readouterr().out
    assert "[tiny] dit sagesla/float: unavailable: attention 'sagesla' is not available" in printed
    assert "2 ok, 3 unavailable" in printed


def test_failures_are_classified():
    assert parts.failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 30.1GiB"))[0] == "oom"
    status, reason = parts.failure(ValueError("shapes do not match\nmore detail"))
    assert (status, reason) == ("error", "ValueError: shapes do not match")
    assert parts.failure(parts.Unavailable("no kernel")) == ("unavailable", "no kernel")


def test_an_error_row_keeps_the_traceback_and_fails_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise ZeroDivisionError("a bug in a part")

    monkeypatch.setitem(parts.OTHER_PARTS, "text", broken)
    assert main(["bench", "--preset", "tiny", "--parts", "text", "--json", str(tmp_path / "b.json")]) == 1
    printed = capsys.readouterr().out
    assert "[tiny] text: error: ZeroDivisionError: a bug in a part" in printed and "1 error" in printed
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "raise ZeroDivisionError" in "\n".join(row["extra"]["traceback"])


def test_rows_run_in_their_own_process_and_the_cache_part_goes_cold_then_warm(tmp_path):
    """`python -m turbojax.bench` with --isolate subprocess: a worker process per row; compile-cache's two first
    generations share a new persistent cache, the second loading what the first compiled."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "turbojax.bench", "--preset", "tiny", "--parts", "text",
                           "compile-cache", "--attention", "dense", "--linears", "float", "--isolate", "subprocess",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rows, one process each" in proc.stdout
    text, cache = json.loads(out.read_text())["rows"]
    assert text["status"] == "ok" and text["device"].startswith("cpu") and text["extra"]["weights_bytes"] > 0
    assert cache["status"] == "ok", cache
    assert cache["extra"]["cache_entries"] > 0 and cache["extra"]["cache_bytes"] > 0
    assert 0 < cache["extra"]["warm_first_call_s"] < cache["first_call_s"]  # programs loaded, not compiled
    assert list(cache["stages"]) == ["text_load", "text_encode", "diffusion", "vae_decode"] + ["write"] * HAS_FFMPEG
    assert "first generation: cold cache" in harness.notes(cache)


def test_a_row_past_its_timeout_is_killed():
    task = {"preset": "tiny", "part": "text", "attention": None, "linears": None, "frames": None, "iters": 1,
            "sla_topk": 0.1}
    row = harness.run_task(task, isolate=True, timeout=0.3)
    assert row["status"] == "timeout" and "--timeout" in row["reason"]


def test_bad_arguments_stop_before_any_row(capsys):
    assert main(["bench", "--preset", "tiny", "--frames", "6"]) == 2
    assert "turbojax bench: error: --frames must be 4k+1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--attention", "flash"])


def test_goals_take_the_best_measured_row():
    def row(preset, part, attention, linears, **fields):
        return harness.make_row({"preset": preset, "part": part, "attention": attention, "linears": linears,
                                 "frames": None, "iters": 3}, **{"status": "ok", **fields})

    rows = [row("1.3b-480p", "sampler", "dense", "float", median_ms=2160.0),
            row("1.3b-480p", "sampler", "sla", "float", median_ms=400.0),
            row("1.3b-480p", "sampler", "sagesla", "float", status="oom", reason="RESOURCE_EXHAUSTED"),
            row("1.3b-480p", "pipeline", "sla", "float", median_ms=1400.0, stages={"diffusion": 1.4}),  # no mp4
            row("14b-720p", "pipeline", "sla", "w8a8", median_ms=9e4, peak_scope="row", stages={"write": 1.0},
                extra={"generate_peak_bytes": 27_000_000_000}),
            row("14b-720p", "pipeline", "sla", "float", median_ms=9e4, peak_scope="row", stages={"write": 1.0},
                extra={"generate_peak_bytes": 20_000_000_000})]
    got = {g["goal"]: g for g in harness.goals(rows)}
    fast = got["diffusion only, 1.3B-480p (4-step sampler)"]
    assert (fast["value"], fast["met"], fast["row"]["attention"]) == (0.4, True, "sla")
    assert fast["ratio"] == pytest.approx(0.4 / 0.45)
    e2e = got["end to end, 1.3B-480p (T5 + DiT + VAE + mp4, warm)"]
    assert (e2e["value"], e2e["met"]) == (1.4, None) and "lower bound" in e2e["caveat"]  # no mp4 write measured
    slow = row("1.3b-480p", "pipeline", "dense", "float", median_ms=2000.0, stages={"diffusion": 2.0})
    assert harness.goals([slow])[3]["met"] is False  # a lower bound past the target misses it anyway
    memory = got["14B-720p W8A8 pipeline, peak device memory (turbojax generate)"]
    assert (memory["value"], memory["met"], memory["row"]["linears"]) == (27.0, False, "w8a8")  # float rows ignored
    text = harness.markdown(rows, harness.goals(rows))
    assert "| diffusion only, 1.3B-480p (4-step sampler) | 0.45 s | 0.400 s | sla, float | 0.89x | yes |" in text


def test_split_runs_merge_into_one_report(i2v_run, tmp_path, capsys):
    first = tmp_path / "a.json"
    first.write_text(json.dumps(i2v_run[1]))
    fast = harness.make_row({"preset": "1.3b-480p", "part": "sampler", "attention": "sla", "linears": "float"},
                            status="ok", median_ms=420.0)
    (tmp_path / "b.json").write_text(json.dumps({"rows": [fast], "goals": []}))
    out = tmp_path / "all.json"
    assert main(["bench", "--merge", str(first), str(tmp_path / "b.json"), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["rows"] == i2v_run[1]["rows"] + [fast]
    assert merged["goals"][0]["value"] == 0.42 and merged["goals"][0]["met"]
    assert "| 1.3b-480p | sampler | sla | float | ok | 420.0 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["bench", "--merge", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a turbojax bench --json report (TypeError" in capsys.readouterr().err


def test_tiny_w8a8_dit_holds_the_reference_quantisation_of_its_float_weights():
    dit = tiny.tiny_dit(0)
    q = parts.w8a8_copy(dit)
    assert q.linears == "w8a8" and q.attention == dit.attention
    w = np.asarray(dit.blocks.ffn.fc1.weight[...])
    want_q, want_s = int8_reference.quantize_blockwise(w[1])
    np.testing.assert_array_equal(np.asarray(q.blocks.ffn.fc1.int8_weight[...])[1], np.asarray(want_q))
    np.testing.assert_array_equal(np.asarray(q.blocks.ffn.fc1.scale[...])[1], np.asarray(want_s))
    shared = q.time_projection.weight[...], dit.time_projection.weight[...]
    np.testing.assert_array_equal(*map(np.asarray, shared))
    assert q.blocks.ffn.fc1.int8_weight[...].dtype == np.int8 and q.blocks.ffn.fc1.weight is None



def test_random_w8a8_dit_is_drawn_without_a_float_copy():
    """The real presets' W8A8 DiT: int8 codes over [-127, 127] whose dequantised weights have a 1/sqrt(fan_in)
    spread, unit norm gains, zero biases, no float block Linears, and a finite forward (2 layers of 1.3B)."""
    from turbojax.bench.dit_forward import forward_inputs
    from turbojax.models.config import get_preset

    cfg = get_preset("wan2.1-t2v-1.3b").replace(num_layers=2)
    dit = parts.random_w8a8_dit(cfg, 0)
    fc1 = dit.blocks.ffn.fc1
    codes = np.asarray(fc1.int8_weight[...])
    assert codes.dtype == np.int8 and codes.min() == -127 and codes.max() == 127 and fc1.weight is None
    spread = codes.astype(np.float64).std() * float(np.asarray(fc1.scale[...]).max()) * np.sqrt(codes.shape[-1])
    assert abs(spread - 1) < 0.01
    assert (np.asarray(dit.blocks.norm3.weight[...]) == 1).all() and (np.asarray(fc1.bias[...]) == 0).all()
    x, t, ctx = forward_inputs(cfg, (1, 16, 1, 8, 8))
    assert np.isfinite(np.asarray(dit(x, t, ctx), np.float32)).all()

# ---------------------------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------------------------

GPU_KERNELS = [  # (name, duration in us, launches): names as an H100 trace spells them
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", 4000.0, 2),
    ("sla_sparse_attention", 1000.0, 1),
    ("entry_mosaic_gpu_kernel", 900.0, 1),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", 3000.0, 3),
    ("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8", 500.0, 1),
    ("w8a8_block_gemm", 700.0, 1),
    ("loop_multiply_fusion", 300.0, 4),
    ("input_reduce_fusion", 200.0, 1),
    ("triton_softmax_1", 150.0, 1),
    ("layer_norm_modulate", 250.0, 1),
    ("MemcpyD2D", 100.0, 1),
    ("cub::DeviceRadixSortOnesweepKernel", 50.0, 1),
]


def write_gpu_trace(path: Path) -> Path:
    """A perfetto_trace.json.gz as jax.profiler writes it on a GPU: the device process with a stream thread and the
    derived "XLA Ops" line (which repeats the kernels as HLO ops), and a host process."""
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 13, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 101, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 701, "tid": 5, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "X", "pid": 701, "tid": 5, "ts": 0.0, "dur": 9e5, "name": "PjitFunction(_program_key)"},
    ]
    ts = 0.0
    for name, dur, launches in GPU_KERNELS:
        for _ in range(launches):
            events.append({"ph": "X", "pid": 1, "tid": 13, "ts": ts, "dur": dur, "name": name,
                           "args": {"hlo_op": "custom-call.3" if "mosaic" in name else "fusion.7"}})
            events.append({"ph": "X", "pid": 1, "tid": 101, "ts": ts, "dur": dur, "name": "fusion.7"})
            ts += dur
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


@pytest.mark.parametrize("name, cls", [(n, c) for (n, *_), c in zip(GPU_KERNELS, [
    "attention", "attention", "attention", "linears", "linears", "linears", "elementwise", "elementwise",
    "elementwise", "elementwise", "other", "other"])] + [
    ("sla_linear_state", "attention"), ("sagesla_sparse_fwd", "attention"), ("w8a8_quantize", "linears"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "linears"), ("wrapped_convert", "elementwise"),
    ("layer_norm_modulate_quantize", "elementwise"), ("Memset", "other")])
def test_kernel_names_classify(name, cls):
    assert profile.classify(name, mosaic_class="attention") == cls


def test_generic_mosaic_kernels_follow_their_hlo_op_or_the_default():
    assert profile.classify("entry_mosaic_gpu_kernel", "jit(f)/sla_attention/pallas_call") == "attention"
    assert profile.classify("entry_mosaic_gpu_kernel", "w8a8 int8_block_matmul") == "linears"
    assert profile.classify("entry_mosaic_gpu_kernel", "custom-call.3") == "other"
    assert profile.classify("sagesla_sparse_fwd_mosaic_mosaic_gpu_kernel") == "attention"  # a named one
    kernels = [{"name": "entry_mosaic_gpu_kernel", "dur": 900.0, "hint": "custom-call.3"}]
    summary = profile.summarize(kernels, runs=1, mosaic_class="other")
    assert summary["classes"]["other"]["ms"] == summary["unnamed_mosaic_ms"] == 0.9
    assert "0.9 ms per call in Mosaic GPU kernels whose names do not say" in profile.markdown(summary)


def test_profile_classifies_a_synthetic_gpu_trace(tmp_path, capsys):
    trace = write_gpu_trace(tmp_path / "perfetto_trace.json.gz")
    out = tmp_path / "profile.json"
    assert profile.main(["--trace", str(trace), "--runs", "2", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    total_ms = sum(d * n for _, d, n in GPU_KERNELS) / 1e3 / 2  # per run; the XLA Ops repeats and the host excluded
    assert summary["kernel_ms"] == pytest.approx(total_ms)
    want = {"attention": (8000 + 1000 + 900) / 2e3, "linears": (9000 + 500 + 700) / 2e3,
            "elementwise": (1200 + 200 + 150 + 250) / 2e3, "other": 150 / 2e3}
    assert {c: v["ms"] for c, v in summary["classes"].items()} == pytest.approx(want)
    assert sum(v["percent"] for v in summary["classes"].values()) == pytest.approx(100.0)
    assert summary["classes"]["linears"]["launches"] == 2.5 and summary["streams"] == ["Stream #13(Compute)"]
    assert [t["name"][:12] for t in summary["top"][:3]] == ["sm90_xmma_ge", "cudnn_genera", "loop_multipl"]
    assert summary["top"][0]["percent"] == pytest.approx(100 * 9000 / (2e3 * total_ms))
    printed = capsys.readouterr().out
    assert "| attention | 5.0 | 44.9 | 2 |" in printed and "top 12 kernels" in printed


def test_profile_refuses_a_trace_without_kernels(tmp_path):
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 1, "tid": 101, "name": "thread_name", "args": {"name": "XLA Ops"}},
              {"ph": "X", "pid": 1, "tid": 101, "ts": 0, "dur": 5, "name": "fusion.1"}]
    with pytest.raises(profile.NoKernelEvents, match="its GPU processes have no kernel events"):
        profile.kernel_events(events)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a GPU trace has kernel events")
def test_profile_on_cpu_says_there_are_no_kernel_events(tmp_path, capsys):
    assert profile.main(["--preset", "tiny", "--steps", "1", "--attention", "dense", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "trace:" in captured.out and "|" not in captured.out  # no table of zeros
    assert re.search(r"no GPU kernel events: it has no GPU process .*/host:CPU \(\d+ events\).*profile on a GPU",
                     captured.err)


@pytest.mark.gpu
def test_profile_on_a_gpu_classifies_the_kernels_of_the_tiny_sampler(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile.main(["--preset", "tiny", "--attention", "dense", "--dir", str(tmp_path), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["kernel_ms"] > 0 and summary["streams"] and summary["top"]
    assert sum(c["percent"] for c in summary["classes"].values()) == pytest.approx(100.0)
    assert summary["wall_ms"] >= summary["kernel_ms"] * 0.5  # the kernels ran inside the timed calls
