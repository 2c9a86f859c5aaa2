"""Smoke test of bench/bench_profile.py: one tiny run on the CPU writes a complete, strict JSON record.

Nothing here asserts on a measured time (the numbers belong to the benchmark): one block of one step per arm,
a few steps of the one-layer A/B, and a profile of the baseline alone (no confirmation, no compile).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_profile.py"


@pytest.fixture(scope="module")
def bench_profile():
    spec = importlib.util.spec_from_file_location("bench_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_run_writes_the_record(bench_profile, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_profile, "TINY_BLOCKS", 2)
    monkeypatch.setattr(bench_profile, "TINY_BLOCK_STEPS", 3)
    out = tmp_path / "record.json"
    assert bench_profile.main(["--models", "convnet", "--blocks", "2", "--block-steps", "1", "--profile-steps", "2",
                               "--variants", "eager", "--json", str(out)]) == 0
    record = json.loads(out.read_text())  # write_json_atomic is strict: no NaN or infinity got in
    assert record["tool"] == "bench_profile" and record["device"].startswith("CPU")
    assert {"torch", "python", "cnnperf"} <= record["versions"].keys()
    assert record["bookkeeping"]["blocks"] == 2 and len(record["bookkeeping"]["block_us_plain"]) == 2
    (row,) = record["rows"]
    assert row["case"] == "convnet" and row["input"] == [64, 1, 28, 28]
    o = row["overhead"]
    assert len(o["block_ms_plain"]) == len(o["block_ms_timed"]) == 2
    assert o["step_ms_plain"] > 0 and o["step_ms_timed"] > 0
    assert math.isclose(o["overhead_ab"], o["step_ms_timed"] / o["step_ms_plain"] - 1)
    assert set(o["reported_phases_ms"]) == {"data", "forward", "backward", "optimizer"}
    p = row["profile"]
    assert p["wall_s"] > 0 and p["steps"] == 2 and p["recommended"] == "eager" and p["confirmation"] is None
    assert [v["name"] for v in p["variants"]] == ["eager"] and p["variants"][0]["timed_steps"] == 2
    text = capsys.readouterr().out
    assert "timed_steps vs a plain step loop" in text and "cnnperf.profile on convnet" in text


def test_default_variants_leave_out_compile_on_the_cpu(bench_profile):
    import torch

    names = bench_profile.default_variants(torch.device("cpu"))
    assert "compile" not in names and "max_autotune" not in names and {"bf16", "channels_last"} <= set(names)
    assert bench_profile.default_variants(torch.device("cuda")) is None  # the profiler's own default


def test_unknown_model_is_a_usage_error(bench_profile):
    with pytest.raises(SystemExit) as e:
        bench_profile.main(["--models", "vgg99"])
    assert e.value.code == 2


def test_independent_ab_of_the_headline(bench_profile, monkeypatch):
    """The A/B that checks a profile's headline: eager and the variant prepared afresh, in alternating blocks,
    at least ``pairs`` of them and for AB_MIN_S seconds; its speed-up the median of the pairs' ratios."""
    import torch

    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    batch = (torch.randn(4, 1, 8, 8), torch.randint(10, (4,)))
    monkeypatch.setattr(bench_profile, "AB_MIN_S", 0.0)
    ab = bench_profile.independent_ab(template, batch, torch.device("cpu"), "channels_last", pairs=3,
                                      block_steps=1)
    assert ab["variant"] == "channels_last" and ab["pairs"] == 3 and ab["block_steps"] == 1
    assert ab["eager_ms"] > 0 and ab["variant_ms"] > 0
    assert math.isclose(ab["speedup_of_medians"], ab["eager_ms"] / ab["variant_ms"])
    low, high = ab["speedup_q20_q80"]
    assert 0 < low <= ab["speedup"] <= high
    monkeypatch.setattr(bench_profile, "AB_MIN_S", 0.3)
    ab = bench_profile.independent_ab(template, batch, torch.device("cpu"), "channels_last", pairs=3,
                                      block_steps=1)
    assert ab["pairs"] > 3 and (ab["seconds"] >= 0.3 or ab["pairs"] == bench_profile.AB_MAX_PAIRS)
