"""bench/gpu_check.sh's own pieces, without a GPU: the record of a run and the check of what the device tool
brings back (at most 8 files, 2 folders down, plain names, 16 MiB a file, 64 MiB in all), and the script's
usage errors. CI runs the whole script as a rehearsal (.ci/run); these pin the limits it checks."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.fixture(scope="module")
def record_module():
    spec = importlib.util.spec_from_file_location("gpu_check_record", ROOT / "bench" / "gpu_check_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_check_out_accepts_what_the_script_writes(record_module, tmp_path):
    for name in ("gpu_check_nvidia-h200_20261130-120000.tar.gz", "gpu_check_nvidia-h200_20261130-120000.json",
                 "gpu_check_nvidia-h200_20261130-120000.log", "a/b/eight.json"):
        _write(tmp_path / name)
    assert record_module.check_out(str(tmp_path)) == []


@pytest.mark.parametrize("files, words", [
    ([f"f{i}.json" for i in range(9)], "9 files, at most 8"),
    (["a/b/c/deep.json"], "3 folders down"),
    (["profile out/report.html"], "'profile out'"),
    (["r\u00e9sum\u00e9.json"], "characters other than"),
])
def test_check_out_names_what_would_not_come_back(record_module, tmp_path, files, words):
    for name in files:
        _write(tmp_path / name)
    problems = record_module.check_out(str(tmp_path))
    assert len(problems) == 1 and words in problems[0], problems


def test_check_out_sizes(record_module, tmp_path, monkeypatch):
    monkeypatch.setattr(record_module, "MAX_FILE_BYTES", 100)
    monkeypatch.setattr(record_module, "MAX_TOTAL_BYTES", 250)
    for i in range(3):
        _write(tmp_path / f"f{i}", 90)
    assert record_module.check_out(str(tmp_path)) == ["0.0 MiB in all, at most 0 MiB"]
    _write(tmp_path / "f0", 101)
    assert any("f0: " in p and "a file" in p for p in record_module.check_out(str(tmp_path)))


def test_record_reads_the_steps_and_the_machine(record_module, tmp_path):
    run = tmp_path / "gpu_check_x_1"
    _write(run / "bench_conv.json")
    (run / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0"}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\t0\t3\t20\nkernel-tests\t124\t150\t150\nbench-clip\tskipped\t0\t50\n")
    rec = record_module.record(str(run), str(steps), "1", "420", "gpu")
    assert json.loads((run / "gpu_check.json").read_text()) == rec
    assert rec["device"] == "NVIDIA H200" and rec["status"] == 1 and rec["mode"] == "gpu"
    assert [(s["step"], s["exit"], s["timed_out"]) for s in rec["steps"]] == [
        ("env", 0, False), ("kernel-tests", 124, True), ("bench-clip", "skipped", False)]
    assert rec["files"] == ["bench_conv.json", "env.json"]


@pytest.mark.parametrize("args, words", [(["--steps", "kernel-tests,nope"], "unknown step 'nope'"),
                                         (["--gpu"], "unknown argument '--gpu'")])
def test_usage_errors_exit_2(args, words):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_help_lists_every_step():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0
    for name in ("kernel-tests", "bench-conv", "train-step", "bench-clip", "profile-resnet50", "other-tests", "doctor",
                 "profile-resnet18", "bench-compile", "--rehearse", "tar -xzf"):
        assert name in proc.stdout, name


@pytest.mark.slow
def test_rehearsal_of_the_train_step_doctor_and_profile_steps(tmp_path):
    """The GPU run's own command lines, followed by the rehearsal's tiny sizes, parse and run here (a --device
    cuda that a later --device cpu overrides once failed the parse), and what is left under $OUT comes back."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse", "--no-install", "--steps",
                           "train-step,doctor,profile-resnet18"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = json.loads(next(out.glob("gpu_check_*.json")).read_text())
    assert [(s["step"], s["exit"]) for s in record["steps"]] == [("env", 0), ("import", 0), ("train-step", 0),
                                                                 ("doctor", 0), ("profile-resnet18", 0)]
    assert record["mode"] == "rehearsal" and {"doctor/doctor.json", "profile_resnet18_b128/profile.json",
                                              "bench_train_step.json"} <= set(record["files"])
    assert len(list(out.iterdir())) == 3
