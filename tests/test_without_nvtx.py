"""The ``nvtx`` package is optional: the GPU machine has NVIDIA's library but not the Python package.

Without it the profiler's phase ranges go through ``torch.cuda.nvtx`` (CUDA) or are left out (CPU), and
``cnnperf profile`` and ``cnnperf doctor`` run as before. The commands run in a subprocess in which ``import nvtx``
fails (``sys.modules["nvtx"] = None``), so the test holds whether or not the package is installed here.
"""

import contextlib
import json
import subprocess
import sys

import pytest
import torch

from cnnperf.profiler import measure

# Runs cnnperf's CLI with `import nvtx` failing; argv[1:] are the command's arguments.
WITHOUT_NVTX = """
import sys
sys.modules["nvtx"] = None
from cnnperf.cli import main
from cnnperf.profiler import measure
assert measure.nvtx_range() is None or measure.nvtx_range().__module__ == "torch.cuda.nvtx"
sys.exit(main(sys.argv[1:]))
"""


def _run_without_nvtx(args, timeout=300):
    return subprocess.run([sys.executable, "-c", WITHOUT_NVTX, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def no_nvtx(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)
    measure.nvtx_range.cache_clear()
    yield
    measure.nvtx_range.cache_clear()


def test_ranges_fall_back_to_torch_cuda_nvtx_then_to_none(no_nvtx, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert measure.nvtx_range() is None
    with measure.phase("forward"):  # no range, no error
        pass
    measure.nvtx_range.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert measure.nvtx_range() is torch.cuda.nvtx.range


def test_ranges_use_the_nvtx_package_when_installed(monkeypatch):
    calls = []

    class FakeNvtx:
        @staticmethod
        @contextlib.contextmanager
        def annotate(message, domain=None):
            calls.append((message, domain))
            yield

    monkeypatch.setitem(sys.modules, "nvtx", FakeNvtx)
    measure.nvtx_range.cache_clear()
    try:
        with measure.phase("backward"):
            pass
    finally:
        measure.nvtx_range.cache_clear()
    assert calls == [("cnnperf/backward", "cnnperf")]


def test_profile_runs_without_nvtx(tmp_path):
    out = tmp_path / "profile"
    proc = _run_without_nvtx(["profile", "--data", "fake", "--model", "convnet", "--batch-size", "8", "--steps",
                              "2", "--warmup", "1", "--variants", "channels_last", "--batch-sizes", "none",
                              "--device", "cpu", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "profile.json").read_text())
    assert [r["status"] for r in record["variants"][:2]] == ["ok", "ok"], record["variants"]
    assert record["variants"][0]["phases_ms"] is not None  # the phases were still timed


def test_doctor_runs_without_nvtx(tmp_path):
    out = tmp_path / "doctor"
    proc = _run_without_nvtx(["doctor", "--data", "fake", "--epochs", "1", "--batch-size", "32", "--out", str(out),
                              "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "doctor.json").read_text())["run"]["epochs_done"] == 1
