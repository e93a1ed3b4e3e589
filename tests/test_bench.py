"""`turbojax bench` (the performance harness) on CPU: the tiny presets through every part, rows and reports with the
documented schema, variants that do not exist or do not fit as rows with a reason, per-row processes, the
persistent-cache part."""

import json
import subprocess
import sys
from pathlib import Path

import os

import numpy as np
import pytest

from pallas_kernels.int8_matmul import reference as int8_reference
from turbojax.bench import harness, parts
from turbojax.cli import main
from turbojax.pipelines import pipeline as pipeline_module
from turbojax.pipelines import tiny

ROOT = Path(__file__).parent.parent
EVERY_PART_BUT_CACHE = ["dit", "sampler", "text", "vae", "mp4", "pipeline"]


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
    for r in rows:
        assert list(r) == list(harness.ROW_FIELDS)
        assert r["status"] == "ok" and r["reason"] is None, r
        assert r["preset"] == "tiny-i2v" and r["frames"] == 1 and r["iters"] == 2
        assert r["device"].startswith("cpu") and r["what"]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert r["peak_bytes"] is None and r["peak_scope"] is None  # XLA:CPU keeps no memory statistics
        assert (r["attention"], r["linears"]) == (("dense", "float") if r["part"] in harness.DIT_PARTS
                                                  else (None, None))
    dit, sampler, *_, pipe = rows
    assert dit["compile_s"] > 0 and dit["program_bytes"] > 0 and dit["extra"]["finite"]
    assert all(r["first_call_s"] > 0 for r in rows[1:])
    assert sampler["extra"]["experts_per_step"] == ["high", "high", "low", "low"]  # sigma_max 200, boundary 0.9
    assert sampler["extra"]["sigma_max"] == 200.0


def test_bench_pipeline_row_has_stages(i2v_run):
    pipe = i2v_run[1]["rows"][-1]
    stages = ["text_load", "text_encode", "image_encode", "diffusion", "vae_decode", "write"]
    assert list(pipe["stages"]) == stages and list(pipe["extra"]["first_call_stages"]) == stages
    assert pipe["stages"]["text_load"] == 0  # warm calls keep the encoder (serve), the first loaded it
    assert pipe["extra"]["first_call_stages"]["text_load"] > 0
    assert pipe["median_ms"] == pytest.approx(1e3 * sum(pipe["stages"].values()), rel=1e-6)  # iters 2: the mean
    assert pipe["first_call_s"] == pytest.approx(sum(pipe["extra"]["first_call_stages"].values()))


def test_bench_markdown_has_every_row_and_the_goals(i2v_run):
    _, report, text = i2v_run
    cells = markdown_rows(text)
    assert [(c[1], c[4]) for c in cells] == [(r["part"], r["status"]) for r in report["rows"]]
    assert all(c[5] == f"{r['median_ms']:.1f}" for c, r in zip(cells, report["rows"]))
    assert [g["goal"] for g in report["goals"]] == [g.goal for g in harness.GOALS]
    assert all(g["value"] is None for g in report["goals"])  # no real preset ran
    assert "| diffusion only, 1.3B-480p (4-step sampler) | 0.45 s | not measured |" in text


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
    proc = subprocess.run([sys.executable, "-m", "turbojax.bench", "--preset", "tiny", "--parts", "mp4",
                           "compile-cache", "--attention", "dense", "--linears", "float", "--isolate", "subprocess",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rows, one process each" in proc.stdout
    mp4, cache = json.loads(out.read_text())["rows"]
    assert mp4["status"] == "ok" and mp4["device"].startswith("cpu") and mp4["extra"]["mp4_bytes"] > 0
    assert cache["status"] == "ok", cache
    assert cache["extra"]["cache_entries"] > 0 and cache["extra"]["cache_bytes"] > 0
    assert 0 < cache["extra"]["warm_first_call_s"] < cache["first_call_s"]  # programs loaded, not compiled
    assert list(cache["stages"]) == ["text_load", "text_encode", "diffusion", "vae_decode", "write"]
    assert "first generation: cold cache" in harness.notes(cache)


def test_a_row_past_its_timeout_is_killed():
    task = {"preset": "tiny", "part": "mp4", "attention": None, "linears": None, "frames": None, "iters": 1,
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
