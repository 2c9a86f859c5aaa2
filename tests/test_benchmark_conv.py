"""The conv benchmark (cnnperf.benchmarks.conv) on the CPU: shapes, timing, checks, the JSON record, the command line.

These test the harness, not the speed of anything: the end-to-end run uses tiny shapes (batch 1, 32x32).
"""

import io
import json
import os

import pytest
import torch
from rich.console import Console

from cnnperf import cli
from cnnperf.benchmarks import conv as bench, harness

# ---------------------------------------------------------------------------------------------------------
# Shapes derived from torchvision.
# ---------------------------------------------------------------------------------------------------------

def _by_name(shapes):
    return {s.name: s for s in shapes}


def test_resnet50_shapes_match_the_architecture():
    shapes = bench.conv_shapes("resnet50")
    # 53 convolutions: the stem, 16 bottlenecks x 3, 4 downsamples. Distinct: the stem, 4 in layer1 (its
    # downsample has conv3's shape), 6 in each of layer2-4.
    assert sum(s.layers for s in shapes) == 53
    assert len(shapes) == 23
    rows = _by_name(shapes)
    stem = rows["resnet50.conv1"]
    assert (stem.n, stem.c_in, stem.h, stem.w, stem.c_out, stem.kh, stem.kw) == (32, 3, 224, 224, 64, 7, 7)
    assert (stem.stride, stem.padding, stem.dilation, stem.groups) == ((2, 2), (3, 3), (1, 1), 1)
    assert stem.output_hw == (112, 112)
    # v1.5: the stride sits on the 3x3 convolution, which still sees the 56x56 input of layer2.
    down = rows["resnet50.layer2.0.conv2"]
    assert (down.c_in, down.h, down.c_out, down.kh, down.stride, down.padding) == (128, 56, 128, 3, (2, 2), (1, 1))
    assert rows["resnet50.layer1.0.conv3"].layers == 4  # three blocks' conv3 + the downsample
    assert "resnet50.layer1.0.downsample.0" not in rows
    last = rows["resnet50.layer4.1.conv2"]
    assert (last.c_in, last.h, last.w, last.c_out, last.layers) == (512, 7, 7, 512, 2)


def test_vgg16_shapes():
    shapes = bench.conv_shapes("vgg16")
    assert sum(s.layers for s in shapes) == 13
    assert len(shapes) == 9
    first = shapes[0]
    assert (first.name, first.c_in, first.h, first.c_out, first.kh, first.padding) == (
        "vgg16.features.0", 3, 224, 64, 3, (1, 1))
    assert _by_name(shapes)["vgg16.features.24"].layers == 3  # the three 512-channel 14x14 convolutions


def test_quick_shapes_keep_the_full_rows_at_a_smaller_size():
    full = bench.conv_shapes("resnet50")
    quick = bench.conv_shapes("resnet50", bench.QUICK_BATCH, bench.QUICK_IMAGE)
    assert [s.name for s in quick] == [s.name for s in full]
    stem = _by_name(quick)["resnet50.conv1"]
    assert (stem.n, stem.h, stem.w) == (bench.QUICK_BATCH, bench.QUICK_IMAGE, bench.QUICK_IMAGE)
    assert all(min(s.output_hw) >= 1 for s in quick)
    assert [(s.c_in, s.c_out, s.kh, s.stride) for s in quick] == [(s.c_in, s.c_out, s.kh, s.stride) for s in full]


def test_flops_fwd_and_fwdbwd():
    stem = bench.conv_shapes("resnet50")[0]
    fwd = 2 * 32 * 64 * 112 * 112 * 3 * 7 * 7
    assert stem.flops("fwd") == fwd
    assert stem.flops("fwdbwd") == 3 * fwd


# ---------------------------------------------------------------------------------------------------------
# Inputs, timing, numerical check, summary.
# ---------------------------------------------------------------------------------------------------------

def _tiny_config():
    args = bench.build_parser().parse_args(["--device", "cpu", "--quick", "--batch", "1", "--image-size", "32"])
    return bench.resolve_config(args)


def test_inputs_are_random_and_rotated():
    cfg = _tiny_config()
    shape = bench.conv_shapes("resnet50", 1, 32)[1]
    sets = bench.input_sets(cfg, shape, "fwdbwd")
    assert len(sets) == bench.rotation_count(sets[0].nbytes()) > 1  # tiny tensors: several copies
    first = sets[0]
    for t in first.leaves() + [first.grad]:
        assert t.count_nonzero() > 0.9 * t.numel()  # never timed on zeros
    assert all(t.requires_grad for t in first.leaves())
    assert first.x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(sets[0].x, sets[1].x)
    assert bench.input_sets(cfg, shape, "fwd")[0].grad is None


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_check_passes_cnnperf_and_catches_a_wrong_result(pass_):
    cfg = _tiny_config()
    shape = bench.conv_shapes("resnet50", 1, 32)[2]  # a 3x3 convolution
    inputs = bench.input_sets(cfg, shape, pass_)[0]
    good = bench.check_cnnperf(bench.make_variant("cnnperf", shape), shape, pass_, inputs)
    assert good["check"] == "ok" and good["check_err"] <= 1

    eager = bench.make_variant("eager", shape)
    wrong = bench.check_cnnperf(lambda x, w, b: eager(x, w, b) * 1.01, shape, pass_, inputs)
    assert wrong["check"].startswith("FAIL output") and wrong["check_err"] > 1


def test_speedups_and_summary():
    rows = [{"pass": "fwd", "model": "resnet50", "name": name, "variant": v, "median_ms": ms}
            for name, v, ms in [("a", "eager", 2.0), ("a", "cnnperf", 1.0),
                                ("b", "eager", 1.0), ("b", "cnnperf", 2.0)]]
    harness.add_speedups(rows[:2], "eager")
    harness.add_speedups(rows[2:], "eager")
    assert [r.get("speedup_vs_eager") for r in rows] == [None, 2.0, None, 0.5]
    summary = bench.summarize(rows)
    assert summary == {"fwd": {"resnet50": {"cnnperf": {"geomean_speedup": 1.0, "min_speedup": 0.5,
                                                       "min_shape": "b", "shapes": 2}}}}


# ---------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------

def test_cli_quick_run_writes_a_complete_record(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--limit", "2", "--no-compile", "--model", "resnet50", "--device", "cpu",
            "--batch", "1", "--image-size", "32", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "resnet50.conv1" in printed and "cnnperf TFLOP/s" in printed and "…" not in printed  # piped: all
    assert os.listdir(tmp_path) == ["bench.json"]

    record = json.loads(out.read_text())
    assert record["complete"] is True and record["device"] and record["argv"] == argv[1:]
    assert {"torch", "triton", "cuda", "cudnn", "python", "cnnperf"} <= set(record["versions"])
    assert record["versions"]["torch"] == torch.__version__
    assert record["peak"]["tflops"] > 0 and record["peak"]["dtype"] == "float32"
    assert record["config"]["variants"] == ["eager", "cnnperf"]

    rows = record["rows"]
    assert len(rows) == 2 * 2 * 2  # shapes x passes x variants
    assert {(r["name"], r["pass"], r["variant"]) for r in rows} == {
        (n, p, v) for n in ("resnet50.conv1", "resnet50.layer1.1.conv1")  # --quick: every 4th shape
        for p in ("fwd", "fwdbwd") for v in ("eager", "cnnperf")}
    for r in rows:
        assert "error" not in r, r
        assert r["device"] == record["device"] and r["dtype"] == "float32" and r["versions"] == record["versions"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0 and r["pct_peak"] > 0
        assert {"n", "c_in", "h", "w", "c_out", "kh", "kw", "stride", "padding", "dilation", "groups"} <= set(r)
        if r["variant"] == "cnnperf":
            assert r["check"] == "ok" and r["speedup_vs_eager"] > 0 and r["path"] == "reference"
    for pass_ in ("fwd", "fwdbwd"):
        s = record["summary"][pass_]["resnet50"]["cnnperf"]
        assert s["shapes"] == 2 and s["geomean_speedup"] > 0
        assert s["min_shape"] in {"resnet50.conv1", "resnet50.layer1.1.conv1"}
    narrow = Console(record=True, width=60, force_terminal=True, file=io.StringIO())
    bench.print_report(record, narrow)
    text = narrow.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 60  # a terminal: what fits, and what was left out
    left_out = " ".join(text.split()).split("(not shown at this width: ")[1].split(")")[0]
    assert "cnnperf TFLOP/s" in left_out and "cnnperf/eager" not in left_out
    assert any(line.split()[:2] == ["resnet50.conv1", "fwd"] and "x" in line.split()[-2] for line in lines)


@pytest.mark.parametrize("argv", [
    ["--model", "alexnet"],
    ["--pass", "bwd"],
    ["--variants", "eager,fast"],
    ["--limit", "0"],
    ["--batch", "two"],
    ["--dtype", "int8"],
    ["--time-budget", "-1"],
    ["--bogus"],
    ["--variants", "compile", "--no-compile"],
    ["--model", "vgg16", "--image-size", "8"],  # too small for VGG's five poolings
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnperf bench: error: ") and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert bench.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_on_the_gpu_uses_do_bench(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--limit", "1", "--no-compile", "--model", "resnet50", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["peak"]["timer"] == "triton.testing.do_bench" and record["peak"]["dtype"] == "bfloat16"
    assert all(r["dtype"] == "bfloat16" and r["median_ms"] > 0 for r in record["rows"])
