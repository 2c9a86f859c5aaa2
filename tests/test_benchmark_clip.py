"""The gradient-clip benchmark (cnnperf.benchmarks.clip) on the CPU: cases, restoring the gradients, the
bandwidth arithmetic, the numerical check, the JSON record and the command line.

These test the harness, not the speed of anything: the end-to-end runs use the 1000 tiny tensors.
"""

import io
import json
import math
import os

import pytest
import torch
from rich.console import Console

from cnnperf import cli
from cnnperf._format import sig
from cnnperf.benchmarks import clip as bench_clip, harness

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------------------------------------

def test_resnet50_and_vgg16_cases_are_the_models_parameters():
    resnet = bench_clip.make_case("resnet50")
    assert resnet.tensors == 161 and resnet.elements == 25_557_032
    assert resnet.shapes[0] == (64, 3, 7, 7) and resnet.shapes[-2:] == ((1000, 2048), (1000,))
    vgg = bench_clip.make_case("vgg16")
    assert vgg.tensors == 32 and vgg.elements == 138_357_544
    assert (25088 * 4096 + 4096) * 4 < vgg.grad_bytes("float32") == 4 * 138_357_544


def test_tiny_case_cycles_sizes_1_to_64():
    tiny = bench_clip.make_case("tiny")
    assert tiny.tensors == 1000
    assert [s[0] for s in tiny.shapes[:66]] == list(range(1, 65)) + [1, 2]
    assert all(len(s) == 1 for s in tiny.shapes)
    assert tiny.elements == 15 * sum(range(1, 65)) + sum(range(1, 41)) == 32_020


def test_dtypes_and_gradient_bytes():
    tiny = bench_clip.make_case("tiny")
    assert tiny.grad_bytes("float32") == 4 * 32_020
    assert tiny.grad_bytes("bfloat16") == tiny.grad_bytes("float16") == 2 * 32_020
    mixed = tiny.dtypes("mixed")
    assert mixed[:3] == [torch.bfloat16, torch.float32, torch.bfloat16]
    even = sum(s[0] for s in tiny.shapes[0::2])
    assert tiny.grad_bytes("mixed") == 2 * even + 4 * (32_020 - even)


def test_gradients_are_random_and_clipped_by_half():
    tiny = bench_clip.make_case("tiny")
    grads = bench_clip.make_grads(tiny, "mixed", CPU)
    assert [p.grad.dtype for p in grads.params] == tiny.dtypes("mixed")
    assert [tuple(p.grad.shape) for p in grads.params] == list(tiny.shapes)
    flat = torch.cat([g.float() for g in grads.grads])
    assert flat.count_nonzero() == flat.numel() and 0.9 < flat.std() < 1.1  # never timed on zeros
    expected = torch.linalg.vector_norm(torch.cat([g.double() for g in grads.grads])).item()
    assert grads.total_norm == pytest.approx(expected, rel=1e-12)
    assert grads.max_norm == pytest.approx(0.5 * expected) and grads.clip_coef == pytest.approx(0.5, abs=1e-6)
    same = bench_clip.make_grads(tiny, "mixed", CPU)
    assert all(torch.equal(a, b) for a, b in zip(grads.grads, same.grads))  # seeded: reruns time equal data


# ---------------------------------------------------------------------------------------------------------
# Why the gradients are restored before every timed call, and that they are.
# ---------------------------------------------------------------------------------------------------------

def test_clipping_the_same_gradients_again_stops_clipping():
    """The documented trap: after two clips the coefficient is exactly 1.0 in fp32 (max_norm 1), so a timed
    loop without restoring would time a clip that scales nothing (and cnnperf would skip the writes)."""
    grads = bench_clip.make_grads(bench_clip.make_case("tiny"), "float32", CPU)
    coefs = []
    for _ in range(4):
        total = torch.nn.utils.clip_grad_norm_(grads.params, 1.0, foreach=True)
        coefs.append(torch.clamp(1.0 / (total + 1e-6), max=1.0).item())
    assert coefs[0] < 0.01 and coefs[1] < 1.0
    assert coefs[2:] == [1.0, 1.0]


@pytest.mark.parametrize("variant", [v for v in bench_clip.VARIANTS if v != "adamw"])  # (adamw does not clip)
def test_every_timed_call_starts_from_the_saved_gradients(variant):
    grads = bench_clip.make_grads(bench_clip.make_case("tiny"), "float32", CPU)
    fn = bench_clip.make_variant(variant)
    totals = []
    timing = bench_clip.time_clip(lambda: totals.append(fn(grads.params, grads.max_norm).item()), grads, CPU,
                                  quick=True, repeat=3)
    assert timing.reps == 3 and len(totals) == 2 + 3  # two warm-up calls, then the timed ones
    assert totals == pytest.approx([grads.total_norm] * 5, rel=1e-5)  # each call saw unclipped gradients
    clipped = torch.linalg.vector_norm(torch.cat(grads.grads)).item()
    assert clipped == pytest.approx(grads.max_norm, rel=1e-5)  # and clipped them by half
    grads.restore()
    assert all(torch.equal(g, s) for g, s in zip(grads.grads, grads.saved))


# ---------------------------------------------------------------------------------------------------------
# Bandwidth, numerical check, summary.
# ---------------------------------------------------------------------------------------------------------

def test_gbps_counts_three_times_the_gradient_bytes():
    assert bench_clip.achieved_gbps(1_000_000_000, 3.0) == pytest.approx(1000.0)  # 3 GB moved in 3 ms
    resnet_bytes = bench_clip.make_case("resnet50").grad_bytes("float32")
    assert resnet_bytes == 4 * 25_557_032
    assert bench_clip.achieved_gbps(resnet_bytes, 0.1) == pytest.approx(3 * resnet_bytes / 1e-4 / 1e9)


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    monkeypatch.setitem(bench_clip.COPY_ELEMENTS, "cpu", 1 << 20)
    bw = bench_clip.measure_copy_bandwidth(CPU)
    assert bw["bytes_per_copy"] == 4 << 20 and bw["counted"] == "bytes read + written"
    assert bw["gbps"] == pytest.approx(2 * bw["bytes_per_copy"] / (bw["ms"] * 1e-3) / 1e9, rel=1e-3)
    assert bw["statistic"] == "min" and "4 MiB" in bw["what"]


@pytest.mark.parametrize("dtype", ["float32", "mixed", "bfloat16"])
def test_check_passes_the_variants_and_catches_wrong_clips(dtype):
    grads = bench_clip.make_grads(bench_clip.make_case("tiny"), dtype, CPU)
    for variant in ("loop", "cnnperf"):
        result = bench_clip.check_variant(bench_clip.make_variant(variant), grads, strict=variant == "cnnperf")
        assert result["check"] == "ok" and result["check_err"] <= 1, (variant, result)
    assert all(torch.equal(g, s) for g, s in zip(grads.grads, grads.saved))  # restored afterwards

    def over_clips(params, max_norm):  # the right total norm, gradients 10 % too small
        return bench_clip.clip_torch(params, 0.9 * max_norm)

    def clips_nothing(params, max_norm):
        return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])).to(params[0].dtype)

    def wrong_total(params, max_norm):
        return bench_clip.clip_torch(params, max_norm) * 1.05

    for wrong, what in [(over_clips, "FAIL gradient"), (clips_nothing, "FAIL gradient"),
                        (wrong_total, "FAIL total norm")]:
        result = bench_clip.check_variant(wrong, grads)
        assert result["check"].startswith(what) and result["check_err"] > 1, (wrong.__name__, result)


def test_step_rows_say_their_time_over_the_step_alone():
    rows = [{"dtype": "float32", "case": "tiny", "variant": v, "median_ms": ms}
            for v, ms in [("torch", 1.0), ("adamw", 2.0), ("torch+adamw", 3.0), ("cnnperf_in_adamw", 2.2)]]
    harness.add_speedups([r for r in rows if r["variant"] in bench_clip.CLIP_VARIANTS], "torch")
    bench_clip.add_step_overheads(rows)
    assert [r.get("step_time_over_adamw") for r in rows] == [None, None, 1.5, 1.1]
    assert all("speedup_vs_torch" not in r for r in rows)
    assert bench_clip.summarize(rows)["step_time_over_adamw"] == {
        "float32": {"tiny": {"torch+adamw": 1.5, "cnnperf_in_adamw": 1.1}}}


def test_the_folded_clip_variant_steps_like_clip_then_step():
    """cnnperf_in_adamw (the clip applied by the fused AdamW step) against torch+adamw, two steps from the same
    parameters and gradients: the same parameters within fp32 ulps."""
    results = []
    for variant in ("torch+adamw", "cnnperf_in_adamw"):
        grads = bench_clip.make_grads(bench_clip.make_case("tiny"), "float32", CPU)
        fn = bench_clip.make_variant(variant)
        for _ in range(2):
            grads.restore()
            fn(grads.params, grads.max_norm)
        results.append([p.detach().clone() for p in grads.params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_speedups_and_summary():
    rows = [{"dtype": "float32", "case": case, "variant": v, "median_ms": ms}
            for case, v, ms in [("tiny", "torch", 2.0), ("tiny", "loop", 8.0), ("tiny", "cnnperf", 0.5),
                                ("resnet50", "torch", 1.0), ("resnet50", "loop", 1.0), ("resnet50", "cnnperf", 2.0)]]
    harness.add_speedups(rows[:3], "torch")
    harness.add_speedups(rows[3:], "torch")
    assert [r.get("speedup_vs_torch") for r in rows] == [None, 0.25, 4.0, None, 1.0, 0.5]
    assert bench_clip.summarize(rows) == {
        "speedup_vs_torch": {"float32": {"tiny": {"loop": 0.25, "cnnperf": 4.0},
                                         "resnet50": {"loop": 1.0, "cnnperf": 0.5}}},
        "geomean_speedup_vs_torch": {"float32": {"loop": 0.5, "cnnperf": sig(math.sqrt(2.0))}}}


# ---------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------

ROW_FIELDS = {"device", "dtype", "case", "variant", "tensors", "elements", "grad_bytes", "bytes_moved", "median_ms",
              "p20_ms", "p80_ms", "gbps", "pct_copy_bw", "kernel_launches", "host_sync_free", "versions",
              "max_norm", "total_norm", "clip_coef"}


def test_cli_quick_run_on_the_tiny_case_writes_a_complete_record(tmp_path, capsys):
    out = tmp_path / "clip.json"
    argv = ["bench-clip", "--quick", "--case", "tiny", "--dtype", "float32,bf16", "--device", "cpu",
            "--repeat", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "cnnperf/torch: geomean" in printed
    assert os.listdir(tmp_path) == ["clip.json"]
    header = [line for line in printed.splitlines() if line.split()[:2] == ["dtype", "case"]]
    assert len(header) == 1 and "launches" in header[0] and "step x" in header[0]  # piped: every column
    assert "…" not in printed

    record = json.loads(out.read_text())
    assert record["schema"] == bench_clip.SCHEMA and record["complete"] is True and record["argv"] == argv[1:]
    assert record["device"].startswith("CPU") and record["device_type"] == "cpu" and record["timestamp"]
    assert {"torch", "triton", "cuda", "cudnn", "python", "cnnperf"} <= set(record["versions"])
    copy = record["copy_bandwidth"]
    assert copy["gbps"] > 0 and copy["counted"] == "bytes read + written" and "host-memory copy" in copy["what"]
    assert record["config"]["cases"] == ["tiny"] and record["config"]["dtypes"] == ["float32", "bfloat16"]

    rows = record["rows"]
    assert [(r["dtype"], r["variant"]) for r in rows] == [
        (d, v) for d in ("float32", "bfloat16") for v in bench_clip.VARIANTS]
    for r in rows:
        if r["variant"] in bench_clip.STEP_VARIANTS:  # their measure is the time over the step alone
            assert ROW_FIELDS - {"gbps", "pct_copy_bw"} <= set(r) and "error" not in r and "gbps" not in r, r
            assert r.get("step_time_over_adamw", 1.0) > 0 and "speedup_vs_torch" not in r
            assert r.get("check", "ok") == "ok" and r["median_ms"] > 0
            assert ("check" in r) == (r["variant"] == "cnnperf_in_adamw")
            continue
        assert ROW_FIELDS <= set(r) and "error" not in r, r
        assert r["device"] == record["device"] and r["versions"] == record["versions"] and r["case"] == "tiny"
        assert (r["tensors"], r["elements"]) == (1000, 32_020)
        assert r["grad_bytes"] == 32_020 * (4 if r["dtype"] == "float32" else 2)
        assert r["bytes_moved"] == 3 * r["grad_bytes"] and r["reps"] == 3
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(3 * r["grad_bytes"] / (r["median_ms"] * 1e-3) / 1e9, rel=1e-3)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / copy["gbps"], rel=1e-3)
        assert r["kernel_launches"] is None and r["host_sync_free"] is None  # CUDA-only measurements
        assert r["clip_coef"] == pytest.approx(0.5, abs=1e-5)
        if r["variant"] == "torch":
            assert "check" not in r and "speedup_vs_torch" not in r
        else:
            assert r["check"] == "ok" and r["speedup_vs_torch"] > 0
        if r["variant"] == "cnnperf":
            assert r["path"] == "reference"
    for dtype in ("float32", "bfloat16"):
        assert set(record["summary"]["speedup_vs_torch"][dtype]["tiny"]) == {"loop", "cnnperf"}
        assert record["summary"]["geomean_speedup_vs_torch"][dtype]["cnnperf"] > 0
    narrow = Console(record=True, width=80, force_terminal=True, file=io.StringIO())
    bench_clip.print_report(record, narrow)
    text = narrow.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80  # a terminal: what fits, and what was left out
    left_out = " ".join(text.split()).split("(not shown at this width: ")[1].split(")")[0]
    assert "launches" in left_out and "vs torch" not in left_out


def test_cpu_defaults_leave_vgg16_out():
    cfg = bench_clip.resolve_config(bench_clip.build_parser().parse_args(["--device", "cpu"]))
    assert cfg.quick and cfg.cases == ["resnet50", "tiny"] and "vgg16" in cfg.skipped
    assert cfg.dtypes == ["float32"] and cfg.variants == list(bench_clip.VARIANTS)
    full = bench_clip.resolve_config(bench_clip.build_parser().parse_args(["--device", "cpu", "--case", "all"]))
    assert full.cases == ["resnet50", "vgg16", "tiny"] and not full.skipped
    assert bench_clip.build_parser().parse_args(["--dtype", "all"]).dtypes == list(bench_clip.DTYPES)


@pytest.mark.parametrize("argv", [
    ["--case", "alexnet"],
    ["--case", ""],
    ["--dtype", "int8"],
    ["--dtype", "float32,fp8"],
    ["--variants", "torch,apex"],
    ["--repeat", "0"],
    ["--repeat", "many"],
    ["--device", "tpu"],
    ["--backend", "cuda"],
    ["--bogus"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert cli.main(["bench-clip", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnperf bench-clip: error: ") and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert bench_clip.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_triton_backend_without_the_interpreter_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench_clip.main(["--backend", "triton", "--case", "tiny"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_on_the_gpu_counts_launches_and_host_syncs(tmp_path):
    out = tmp_path / "clip.json"
    assert bench_clip.main(["--quick", "--case", "tiny", "--dtype", "float32,mixed", "--repeat", "10",
                            "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["copy_bandwidth"]["timer"] == "triton.testing.do_bench"
    by = {(r["dtype"], r["case"], r["variant"]): r for r in record["rows"]}
    assert set(by) == {(d, "tiny", v) for d in ("float32", "mixed") for v in bench_clip.VARIANTS}
    for (_, _, variant), r in by.items():
        assert "error" not in r and r["median_ms"] > 0 and r["reps"] == 10, r
        assert r["kernel_launches"] >= 1
        if variant == "cnnperf":
            assert r["path"] == "triton" and r["host_sync_free"] is True and r["check"] == "ok"
            assert r["kernel_launches"] <= 6  # partial norms, per-tensor reduce, finalize, scale (+ a cast)
        if variant == "loop":
            assert r["kernel_launches"] >= 2000  # a norm and a multiply per tensor
