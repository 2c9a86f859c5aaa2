"""``cnnperf profile`` end to end: a short run writes profile.json and report.html, --quiet prints one line,
--trace writes a trace next to them, bad arguments exit 2 with one line on stderr, Ctrl-C still writes the
record of what was measured and exits 130, and the default command finishes inside 3 minutes on a CPU."""

import json
import subprocess
import sys
import time

import pytest
import torch

from cnnperf.profiler import cli

# convnet on fake CIFAR-shaped data, a small batch, few steps: seconds per variant on a 2-core CPU
SHORT = ["--data", "fake", "--model", "convnet", "--batch-size", "16", "--steps", "3", "--warmup", "1",
         "--batch-sizes", "none"]


def read_record(out):
    """profile.json, parsed strictly: a NaN or Infinity in it (not JSON) fails the test."""
    def reject(constant):
        raise AssertionError(f"profile.json holds {constant}, which is not JSON")

    with open(out / "profile.json") as f:
        return json.load(f, parse_constant=reject)


def test_a_short_run_writes_both_reports_and_quiet_prints_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([*SHORT, "--variants", "channels_last,fuse", "--out", str(out), "--quiet"]) == 0
    record = read_record(out)
    assert (out / "report.html").stat().st_size > 1000
    assert record["schema"] == "cnnperf.profile/1"
    run = record["run"]
    assert run["model"] == "convnet" and run["data"] == "fake" and run["optimizer"].lower() == "adam"
    assert run["batch_size"] == 16 and run["steps"] == 3 and run["warmup"] == 1 and run["world_size"] == 1
    assert run["interrupted"] is False and run["device"] == "cpu"
    names = [r["name"] for r in record["variants"]]
    assert names[:3] == ["eager", "channels_last", "fuse"], names
    assert all(r["status"] == "ok" for r in record["variants"][:3]), record["variants"]
    assert record["batch_sweep"] is None  # --batch-sizes none
    assert record.get("trace") is None  # no --trace
    variant = record["recommendation"]["variant"]
    assert variant in names
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines  # --quiet: the recommendation line only
    assert lines[0].startswith("cnnperf profile: ") and variant in lines[0] and "profile.json" in lines[0]


def test_trace_is_written_next_to_the_record_with_a_relative_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*SHORT, "--variants", "channels_last", "--out", "rel/out", "--trace"]) == 0
    out = tmp_path / "rel" / "out"
    record = read_record(out)
    assert record["trace"] == "trace.json"  # relative to the record's folder, whatever --out was
    trace = json.loads((out / record["trace"]).read_text())
    assert trace["traceEvents"]
    assert record["top_ops"]["ops"] and record["top_ops"]["variant"] == record["recommendation"]["variant"]
    stdout = capsys.readouterr().out
    assert "profile.json" in stdout  # not --quiet: the summary, then how to apply the recommendation
    if record["recommendation"]["variant"] == "eager":
        assert "Nothing to apply" in stdout
    else:
        assert f"cnnperf.optimize(model, optimizer, {record['recommendation']['variant']!r}" in stdout


@pytest.mark.parametrize("interrupt_at", [1, 2], ids=["in-the-baseline", "in-the-second-variant"])
def test_ctrl_c_writes_the_record_of_what_was_measured_and_exits_130(interrupt_at, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt raised from inside the timed steps (as SIGINT does), in the baseline's or in
    channels_last's: profile() turns it into ProfileInterrupted with the partial record, the CLI writes it."""
    from cnnperf.profiler import measure

    calls = {"n": 0}
    original = measure.timed_steps

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(measure, "timed_steps", interrupting)
    out = tmp_path / "out"
    assert cli.main([*SHORT, "--variants", "channels_last,fuse", "--out", str(out), "--quiet"]) == 130
    record = read_record(out)
    assert record["schema"] == "cnnperf.profile/1"
    assert record["run"]["interrupted"] is True and record["run"]["model"] == "convnet"
    names = [r["name"] for r in record.get("variants") or []]
    assert names == ["eager"][:interrupt_at - 1]  # the rows finished before the interrupt, no more
    if interrupt_at == 2:
        assert record["recommendation"]["variant"] == "eager"
    assert (out / "report.html").exists()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "profile.json" in lines[0], lines


def test_ctrl_c_raised_by_profile_itself(tmp_path, monkeypatch):
    """A ProfileInterrupted straight from profile() (e.g. Ctrl-C before anything was measured)."""
    from cnnperf.profiler import core

    def interrupted(*args, run_info=None, **kwargs):
        raise core.ProfileInterrupted(core.ProfileResult({"schema": core.SCHEMA,
                                                          "run": {**run_info, "interrupted": True}}))

    monkeypatch.setattr(core, "profile", interrupted)
    out = tmp_path / "out"
    assert cli.main([*SHORT, "--out", str(out), "--quiet"]) == 130
    record = read_record(out)
    assert record["run"]["interrupted"] is True and record["run"]["model"] == "convnet"
    assert (out / "report.html").exists()


def test_a_failing_baseline_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    from cnnperf.profiler import measure

    def failing(*args, **kwargs):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(measure, "timed_steps", failing)
    out = tmp_path / "out"
    assert cli.main([*SHORT, "--variants", "channels_last", "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnperf profile: error: "), lines
    assert "baseline" in lines[0] and "the step broke" in lines[0]
    assert not (out / "profile.json").exists()


BAD = [
    (["--steps", "1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--variants", "bogus"], "--variants"),
    (["--variants", "bf16+fp16"], "--variants"),
    (["--variants", "compile+max_autotune"], "--variants"),
    (["--variants", ","], "--variants"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "8,x"], "--batch-sizes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"),
    (["--model", "nope"], "--model"),
    (["--data", "nope"], "--data"),
    (["--data-root", "/nonexistent/data"], "--data-root"),
    (["--lr", "0"], "--lr"),
    (["--workers", "-1"], "--workers"),
    (["--no-such-option"], "--no-such-option"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(args, named, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnperf profile: error: ") and named in lines[0], captured.err
    assert not (tmp_path / "profile.json").exists()


def test_out_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert cli.main([*SHORT, "--out", str(target)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnperf profile: error: ") and str(target) in lines[0], lines


def test_out_under_a_file_says_what_is_wrong_with_out(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert cli.main([*SHORT, "--out", str(target / "reports")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("cnnperf profile: error: --out ") and "is a file" in line and "Errno" not in line


def test_failed_data_loading_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "reports"
    assert cli.main([*SHORT, "--data", "cifar10", "--data-root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_trace_is_named_with_its_folder_and_absent_from_a_run_without_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([*SHORT, "--variants", "channels_last", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<dt>trace</dt>" not in page and "Trace:" not in capsys.readouterr().out
    assert cli.main([*SHORT, "--variants", "channels_last", "--out", str(out), "--trace"]) == 0
    assert f"the trace {out / 'trace.json'}" in capsys.readouterr().out.replace("\n", "")


def test_a_later_device_overrides_an_earlier_one():
    assert str(cli.parse(["--device", "cuda", "--batch-size", "2", "--device", "cpu"]).device) == "cpu"


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--batch-sizes" in text and "--variants" in text and "channels_last" in text


def test_the_cnnperf_command_lists_profile(capsys):
    from cnnperf import cli as top

    assert "profile" in top.COMMANDS
    assert top.main(["profile", "--help"]) == 0
    assert "usage: cnnperf profile" in capsys.readouterr().out
    top.main([])  # no subcommand: the list of them
    assert "profile" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_command_in_a_subprocess_finishes_inside_3_minutes(tmp_path):
    out = tmp_path / "default-out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnnperf", "profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    print(f"default `cnnperf profile` took {wall:.1f} s wall")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    record = read_record(out)
    assert record["run"]["model"] == "convnet" and record["run"]["data"] == "digits"
    assert record["run"]["interrupted"] is False and record["recommendation"]["variant"]
    assert (out / "report.html").exists()
    assert "cnnperf.optimize(model, optimizer, " in proc.stdout or "Nothing to apply" in proc.stdout
    assert "gpuGetDeviceCount" not in proc.stderr and "profiler_start" not in proc.stderr
    assert wall < 180, f"the default run took {wall:.0f} s (elapsed in the record: {record['run']['elapsed_s']:.0f} s)"
