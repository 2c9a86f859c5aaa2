"""The small shared modules every tool uses: _io (atomic strict JSON), _timing, _format, _env, _cli."""

import argparse
import json
import math
import os
import re
import statistics

import pytest
import torch

from cnnperf import _cli, _env, _format, _io, _timing

# ---------------------------------------------------------------------------------------------------------
# _io
# ---------------------------------------------------------------------------------------------------------

def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "record.json"
    _io.write_json_atomic(path, {"rows": [1]})
    _io.write_json_atomic(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert os.listdir(path.parent) == ["record.json"]


def test_write_json_atomic_writes_strict_json_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    _io.write_json_atomic(path, {"rows": [math.nan, math.inf, (1, 2), torch.tensor(3.5)]})

    def reject(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=reject) == {"rows": [None, None, [1, 2], 3.5]}
    with pytest.raises(TypeError):
        _io.write_json_atomic(path, {"rows": [object()]})  # not JSON at all: refused before writing

    def fail(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst)  # same directory: the rename is atomic
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _io.write_json_atomic(path, {"rows": [1, 2, 3]})
    assert json.loads(path.read_text())["rows"][2] == [1, 2]
    assert os.listdir(tmp_path) == ["record.json"]


# ---------------------------------------------------------------------------------------------------------
# _timing
# ---------------------------------------------------------------------------------------------------------

def test_time_host_quantiles_and_reset_outside_the_clock():
    calls = []
    timing = _timing.time_host(lambda: calls.append("call"), torch.device("cpu"),
                               reset=lambda: calls.append("reset"), budget_s=0.01, min_reps=5, max_reps=20)
    assert 5 <= timing.reps <= 20
    assert 0 < timing.min_ms <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert calls == ["reset", "call"] * (timing.reps + 2)  # two warm-up calls, then the timed ones


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1 * i for i in range(37)]])
def test_quantiles_interpolate_as_torch(values):
    qs = [0.0, 0.2, 0.5, 0.8, 1.0]
    expected = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor(qs, dtype=torch.float64)).tolist()
    assert _timing.quantiles(values, qs) == pytest.approx(expected)
    assert _timing.quantile(values, 0.5) == pytest.approx(statistics.median(values))
    assert all(math.isnan(q) for q in _timing.quantiles([], qs))


def test_geomean():
    assert _timing.geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert _timing.geomean([4.0]) == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------------------
# _format
# ---------------------------------------------------------------------------------------------------------

def test_reading_missing_values():
    assert math.isnan(_format.num(None)) and math.isnan(_format.num("x")) and _format.num(torch.tensor(2)) == 2
    assert _format.finite(math.inf) is None and _format.finite(None) is None and _format.finite(3) == 3.0
    assert _format.int_or_none(2.7) == 2 and _format.int_or_none(math.nan) is None
    assert _format.text(None) == "?" and _format.text(3) == "3"


def test_writing_values():
    assert _format.fmt(None) == "-" and _format.fmt(3, "d") == "3" and _format.fmt(0.123456) == "0.1235"
    assert _format.fmt(math.nan) == "nan" and _format.fmt(-math.inf) == "-inf" and _format.fmt("x") == "-"
    assert _format.pct(0.1234) == "12.3 %" and _format.duration(125) == "2 min 05 s"
    assert _format.plural(1, "epoch") == "1 epoch" and _format.plural(2, "epoch") == "2 epochs"
    assert _format.sig(1.234567891) == 1.2346 and _format.dtype_name(torch.bfloat16) == "bfloat16"


# ---------------------------------------------------------------------------------------------------------
# _env
# ---------------------------------------------------------------------------------------------------------

def test_record_header_and_versions():
    header = _env.record_header("cnnperf test", torch.device("cpu"), ["--x"])
    assert header["tool"] == "cnnperf test" and header["device_type"] == "cpu" and header["argv"] == ["--x"]
    assert header["device"].startswith("CPU ") and header["timestamp"].endswith("+00:00")
    v = header["versions"]
    assert v["torch"] == torch.__version__ and v["cnnperf"] == __import__("cnnperf").__version__
    assert {"triton", "cuda", "cudnn", "python", "numpy", "sklearn", "torchvision"} <= set(v)
    assert _env.device_slug("NVIDIA H200") == "nvidia-h200" and _env.cpu_count() >= 1


# ---------------------------------------------------------------------------------------------------------
# _cli
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convert, text, value", [
    (_cli.positive_int, "3", 3), (_cli.nonnegative_int, "0", 0), (_cli.at_least(2), "2", 2),
    (_cli.positive_float, "1e-3", 1e-3), (_cli.nonnegative_float, "0", 0.0),
    (_cli.choice_list(["a", "b"]), "b,a,b", ["b", "a"]), (_cli.choice_list(["a", "b"]), "all", ["a", "b"]),
    (_cli.dtype_name(["float32", "bfloat16"]), "bf16", "bfloat16"), (_cli.device, "cpu", torch.device("cpu")),
])
def test_converters_accept(convert, text, value):
    assert convert(text) == value


@pytest.mark.parametrize("convert, text, words", [
    (_cli.positive_int, "0", "at least 1, got 0"), (_cli.positive_int, "two", "'two'"),
    (_cli.nonnegative_int, "-1", "at least 0, got -1"), (_cli.at_least(2, " (why)"), "1", "at least 2 (why), got 1"),
    (_cli.positive_float, "0", "positive number, got '0'"), (_cli.positive_float, "nan", "'nan'"),
    (_cli.positive_float, "inf", "'inf'"), (_cli.nonnegative_float, "-1e-9", "'-1e-9'"),
    (_cli.choice_list(["a"]), "a,c", "'a,c'"), (_cli.choice_list(["a"]), ",", "','"),
    (_cli.dtype_name(["float32"]), "int8", "'int8'"), (_cli.device, "tpu", "'tpu'"),
    (_cli.device, "meta", "only cpu and cuda"), (_cli.existing_dir, "/no/such/dir", "/no/such/dir is not a directory"),
])
def test_converters_refuse_naming_what_was_given(convert, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(words)):
        convert(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_device_this_machine_lacks_is_a_usage_error_after_parsing():
    assert _cli.device("cuda") == torch.device("cuda")  # a device cnnperf runs on: the parse accepts it
    with pytest.raises(_cli.UsageError, match="--device cuda: no CUDA device is available here"):
        _cli.check_device(torch.device("cuda"))
    assert _cli.check_device(torch.device("cpu")) == torch.device("cpu")


def test_run_exit_protocol(capsys):
    def parse(argv):
        p = _cli.Parser(prog="tool")
        p.add_argument("--n", type=_cli.positive_int, default=1)
        return p.parse_args(argv)

    assert _cli.run("tool", ["--n", "7"], parse, lambda args: args.n) == 7
    assert _cli.run("tool", ["--n", "0"], parse, lambda args: 0) == 2
    assert capsys.readouterr().err == "tool: error: argument --n: must be at least 1, got 0\n"
    assert _cli.run("tool", ["--help"], parse, lambda args: 0) == 0

    def late(args):
        raise _cli.UsageError("--data-root x is not a directory")

    assert _cli.run("tool", [], parse, late) == 2
    assert capsys.readouterr().err.endswith("tool: error: --data-root x is not a directory\n")

    def interrupted(args):
        raise KeyboardInterrupt

    assert _cli.run("tool", [], parse, interrupted, interrupted="stopped early") == 130
    assert capsys.readouterr().err == "tool: stopped early\n"
