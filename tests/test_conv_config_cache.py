"""CNNPERF_CONFIG_CACHE (cnnperf/ops/conv_config_cache.py), CNNPERF_AUTOTUNE and deterministic choices.

The GPU-only calls (device name, the model's pick, the autotuner) are stood in for, so the order of the
choice in ``_config`` and what ``_launch`` writes are checked on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from cnnperf import perf_model as pm
from cnnperf.ops import conv_bias_relu as op, conv_config_cache as cache

CONV = pm.Conv(2, 64, 14, 14, 64, 3, 3, (1, 1), (1, 1))
CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
MODEL = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
TUNED = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 5}


@pytest.fixture
def gpu_free(monkeypatch, tmp_path):
    """_config as on a GPU, without one: no interpreter, a fixed model pick, a fixed device name."""
    monkeypatch.setattr(op.backend, "interpret", lambda: False)
    monkeypatch.setattr(op, "model_config", lambda kind, conv, dtype, index, variant="": dict(MODEL))
    monkeypatch.setattr(op, "_device_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("CNNPERF_AUTOTUNE", raising=False)
    file = tmp_path / "configs.json"
    monkeypatch.setenv(cache.ENV, str(file))
    return file


def test_record_and_lookup_round_trip_and_merge(tmp_path):
    file = str(tmp_path / "sub" / "c.json")
    assert cache.lookup(file, "k") is None  # no file yet
    cache.record(file, "a", TUNED)
    other = json.loads(open(file).read())
    other["entries"]["b"] = MODEL  # another process adds an entry meanwhile
    open(file, "w").write(json.dumps(other))
    cache.record(file, "c", MODEL)
    assert cache.lookup(file, "a") == TUNED and cache.lookup(file, "b") == MODEL and cache.lookup(file, "c") == MODEL
    assert json.loads(open(file).read())["schema"] == cache.SCHEMA


def test_lookup_looks_at_the_file_at_most_every_recheck_interval(tmp_path, monkeypatch):
    """lookup() runs on every launch: another process's write is seen within RECHECK_S, not by a stat a call."""
    clock = [1000.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: clock[0])
    file = str(tmp_path / "c.json")
    assert cache.lookup(file, "a") is None  # no file yet
    open(file, "w").write(json.dumps({"schema": cache.SCHEMA, "entries": {"a": TUNED}}))  # another process
    assert cache.lookup(file, "a") is None  # not looked at again yet
    clock[0] += cache.RECHECK_S
    assert cache.lookup(file, "a") == TUNED


def test_a_bad_file_is_an_error_naming_the_variable(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RuntimeError, match="CNNPERF_CONFIG_CACHE=.*bad.json"):
        cache.lookup(str(bad), "k")
    bad.write_text(json.dumps({"schema": "other", "entries": {}}))
    with pytest.raises(RuntimeError, match="not a cnnperf config cache"):
        cache.lookup(str(bad), "k")


def test_an_entry_that_is_not_a_config_is_ignored_with_a_warning(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"schema": cache.SCHEMA, "entries": {"a": [64, 64], "b": {"BLOCK_M": 64}}}))
    for entry in ("a", "b"):
        with pytest.warns(RuntimeWarning, match="not a kernel config"):
            assert cache.lookup(str(file), entry) is None


def test_writers_in_other_processes_merge(tmp_path):
    """Processes that tune at once (one per rank) keep each other's entries: the lock file serialises them."""
    import subprocess
    import sys
    import time

    file, go = str(tmp_path / "c.json"), tmp_path / "go"
    code = ("import os, sys, time; from cnnperf.ops import conv_config_cache as c\n"
            "while not os.path.exists(sys.argv[3]): time.sleep(0.001)\n"  # all start writing at once
            "for i in range(50): c.record(sys.argv[1], f'{sys.argv[2]}{i}', {'BLOCK_M': 64, 'BLOCK_N': 64, "
            "'BLOCK_K': 32})")
    procs = [subprocess.Popen([sys.executable, "-c", code, file, tag, str(go)]) for tag in "abcd"]
    time.sleep(3)  # the imports
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert len(json.loads(open(file).read())["entries"]) == 200


def test_keys_tell_devices_versions_kernels_and_shapes_apart():
    keys = {cache.key("H200", "3.6.0", "fwd", "torch.bfloat16", CONV),
            cache.key("H100", "3.6.0", "fwd", "torch.bfloat16", CONV),
            cache.key("H200", "3.8.0", "fwd", "torch.bfloat16", CONV),
            cache.key("H200", "3.6.0", "wgrad", "torch.bfloat16", CONV),
            cache.key("H200", "3.6.0", "fwd", "torch.float16", CONV),
            cache.key("H200", "3.6.0", "fwd", "torch.bfloat16", pm.Conv(2, 64, 14, 14, 64, 3, 3, (2, 2), (1, 1)))}
    assert len(keys) == 6


def test_the_model_picks_unless_the_file_has_the_shape(gpu_free):
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) == MODEL
    cache.record(str(gpu_free), op._cache_entry("fwd", CONV, torch.bfloat16, CUDA), TUNED)
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) == TUNED
    assert op._config("dgrad", CONV, torch.bfloat16, CUDA) == MODEL  # another kernel: not in the file
    with op.pinned_configs(fwd=MODEL):
        assert op._config("fwd", CONV, torch.bfloat16, CUDA) == MODEL  # pinned first


def test_autotune_records_its_winner_and_determinism_does_not_tune(gpu_free, monkeypatch):
    monkeypatch.setenv("CNNPERF_AUTOTUNE", "1")
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) is None  # not in the file: tune
    launched = []

    class Tuner:  # stands for triton.autotune's Autotuner: kernel[grid](...), then .best_config
        best_config = type("Config", (), {"kwargs": {k: TUNED[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                                            "GROUP_M")},
                                          "num_warps": 4, "num_stages": 5})()

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs)

    monkeypatch.setattr(op._kernels(), "conv_bias_relu_fwd_autotuned", lambda dtype, residual=False: Tuner())
    op._launch("fwd", torch.bfloat16, None, None, (), {"KH": 3}, CONV, CUDA)
    assert launched == [{"KH": 3}]
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) == TUNED  # from the file now, no second tuning
    torch.use_deterministic_algorithms(True)
    try:
        assert op._config("dgrad", CONV, torch.bfloat16, CUDA) == MODEL  # the same every run: no timing
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_autotuning_inside_cuda_graph_capture(gpu_free, monkeypatch):
    """A shape first seen while a CUDA graph is captured gets the model's config: the autotuner's timing
    launches would fail the capture."""
    monkeypatch.setenv("CNNPERF_AUTOTUNE", "1")
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert op._config("fwd", CONV, torch.bfloat16, CUDA) == MODEL


def test_auto_backend_choice_is_fixed_under_deterministic_algorithms():
    def timer(fn):
        raise AssertionError("nothing may be timed")

    torch.use_deterministic_algorithms(True)
    try:
        assert op._auto_pick(("test-deterministic",), None, None, timer) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)
    assert ("test-deterministic",) not in op._auto_choice
