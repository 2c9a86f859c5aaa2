"""``cnnperf doctor`` end to end: a short run writes doctor.json and report.html, bad arguments exit 2 with one
line on stderr, Ctrl-C still writes the report of the epochs that finished and exits 130."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cnnperf.doctor import cli

SHORT = ["--epochs", "1", "--limit-batches", "3"]


def read_record(out):
    """doctor.json, parsed strictly: a NaN or Infinity in it (not JSON) fails the test."""
    def reject(constant):
        raise AssertionError(f"doctor.json holds {constant}, which is not JSON")

    with open(out / "doctor.json") as f:
        return json.load(f, parse_constant=reject)


def test_a_short_run_writes_both_reports(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--data", "fake", *SHORT, "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    record = read_record(out)
    assert (out / "report.html").stat().st_size > 1000
    run = record["run"]
    assert record["schema"] == "cnnperf.doctor/1"
    assert run["model"] == "convnet" and run["data"] == "fake" and run["epochs_done"] == 1
    assert run["interrupted"] is False and run["batch_size"] == 32 and run["optimizer"] == "adam"
    assert run["lr"] == 1e-3 and run["train_size"] == 512 and run["val_size"] == 128
    assert len(record["history"]["steps"]["step"]) == 3
    assert record["metrics"]["classes"] == [str(i) for i in range(10)]
    assert len(record["metrics"]["confusion_matrix"]) == 10
    assert record["lr_finder"] is None
    kinds = {f["kind"] for f in record["findings"]}
    assert kinds <= set(cli_kinds())
    out_text = capsys.readouterr().out
    assert out_text.count("\n") == 1 and "doctor.json" in out_text  # --quiet: the verdict line only


def cli_kinds():
    from cnnperf.doctor.findings import KINDS
    return KINDS


def test_find_lr_and_options_reach_the_record(tmp_path):
    out = tmp_path / "out"
    code = cli.main(["--data", "fake", *SHORT, "--batch-size", "16", "--find-lr", "--optimizer", "sgd",
                     "--lr", "0.01", "--clip", "1",
                     "--weight-decay", "0", "--sample-every", "1", "--seed", "3", "--monitor", "val_loss",
                     "--out", str(out), "--quiet"])
    assert code == 0
    record = read_record(out)
    finder = record["lr_finder"]
    assert finder["method"] in ("steepest descent", "min loss / 10") and finder["suggested_lr"] > 0
    assert finder["lrs"][0] == pytest.approx(1e-7) and len(finder["lrs"]) == len(finder["losses"]) <= 100
    run = record["run"]
    assert (run["optimizer"], run["lr"], run["clip"], run["weight_decay"], run["seed"]) == ("sgd", 0.01, 1.0, 0.0, 3)
    assert run["interface"] == "cli" and run["monitor"] == "val_loss"  # flags in the advice; best by the loss
    assert record["history"]["layers"]["steps"] == [1, 2, 3]


def test_the_default_command_in_a_subprocess(tmp_path):
    out = tmp_path / "default-out"
    proc = subprocess.run([sys.executable, "-m", "cnnperf", "doctor", *SHORT, "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    record = read_record(out)
    assert record["run"]["model"] == "convnet" and record["run"]["data"] == "digits"
    assert record["run"]["train_size"] + record["run"]["val_size"] == 1797
    assert (out / "report.html").exists()
    assert "epoch 1/1" in proc.stdout and "Verdict" in proc.stdout  # no TTY: a line per epoch, then the summary
    assert "Traceback" not in proc.stderr


BAD = [
    (["--model", "nope"], "--model"),
    (["--data", "nope"], "--data"),
    (["--data", "mnist", "--data-root", "/nonexistent/mnist"], "--data-root"),
    (["--data", "imagefolder"], "imagefolder"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--clip", "0"], "--clip"),
    (["--device", "tpu"], "--device"),
    (["--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(args, named, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnperf doctor: error: ") and named in lines[0], captured.err
    assert not (tmp_path / "doctor.json").exists()


@pytest.mark.parametrize("args", [["--model", "resnet99"], ["--data", "cifar10", "--data-root", "/nonexistent"]])
def test_bad_arguments_in_a_subprocess(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnperf", "doctor", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_later_device_overrides_an_earlier_one():
    """The GPU check's rehearsal appends --device cpu to the GPU run's --device cuda: the first must not fail
    the parse on a machine without CUDA."""
    assert str(cli.parse(["--device", "cuda", "--epochs", "1", "--device", "cpu"]).device) == "cpu"


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "--find-lr" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_writes_the_report_of_the_finished_epochs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cnnperf", "doctor", "--data", "fake", "--epochs", "10000",
                             "--limit-batches", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = threading.Event()
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 2/"):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(180), "".join(lines) + proc.stderr.read()
        time.sleep(0.2)  # somewhere inside epoch 3 (or its validation)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = proc.stderr.read()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    record = read_record(out)
    assert record["run"]["interrupted"] is True and record["run"]["epochs"] == 10000
    done = record["run"]["epochs_done"]
    assert done >= 2 and len(record["history"]["epochs"]) == done
    assert (out / "report.html").exists()
    assert any("Interrupted after" in line for line in lines)


def test_ctrl_c_in_process_returns_130(tmp_path, monkeypatch):
    """KeyboardInterrupt raised from inside the training loop (as SIGINT does) in the first epoch."""
    from cnnperf.doctor import monitor

    calls = {"n": 0}
    original = monitor.Doctor.after_step

    def interrupting(self, optimizer=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, optimizer)

    monkeypatch.setattr(monitor.Doctor, "after_step", interrupting)
    out = tmp_path / "out"
    assert cli.main(["--data", "fake", *SHORT, "--out", str(out), "--quiet"]) == 130
    record = read_record(out)
    assert record["run"]["interrupted"] is True and record["run"]["epochs_done"] == 0
    assert record["history"]["epochs"] == [] and record["metrics"] is None
    assert len(record["history"]["steps"]["step"]) == 2
    assert os.path.exists(out / "report.html")
