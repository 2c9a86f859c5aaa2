"""The gradient norm + clip under pytest-benchmark: one case per dtype x case x variant.

Run with ``pytest bench/test_bench_clip.py --benchmark-only`` (add ``--benchmark-json=PATH`` to keep a record).
The cases are those of ``cnnperf bench-clip`` with its defaults for this machine (on the CPU: ResNet-50 and the
1000 tiny tensors, fp32); ``CNNPERF_BENCH_CLIP_ARGS`` takes that command's options to choose others, e.g.
``CNNPERF_BENCH_CLIP_ARGS="--case all --dtype float32,bf16"``. Rounds: ``--bench-rounds`` (conftest.py).

pytest-benchmark times with a host clock, so every timed call ends with a device synchronisation, and the
gradients are restored (and synchronised) in its set-up, outside the clock, because a clip shrinks them in
place; ``cnnperf bench-clip`` (CUDA events) is the reference for GPU numbers.
"""

import os
import shlex

import pytest

from cnnperf._cli import UsageError
from cnnperf._env import device_name, versions
from cnnperf._timing import synchronize
from cnnperf.benchmarks import clip as bench_clip

_CONFIG = []
_GRADS = {}  # the gradients of the last (dtype, case): the variants of one case run one after another


def _config() -> bench_clip.Config:
    if not _CONFIG:
        text = os.environ.get("CNNPERF_BENCH_CLIP_ARGS", "")
        try:
            _CONFIG.append(bench_clip.resolve_config(bench_clip.build_parser().parse_args(shlex.split(text))))
        except UsageError as e:
            raise pytest.UsageError(f"CNNPERF_BENCH_CLIP_ARGS: {e}") from None
    return _CONFIG[0]


def _grads(dtype: str, case: str) -> bench_clip.Grads:
    if (dtype, case) not in _GRADS:
        _GRADS.clear()  # free the previous case's gradients first
        cfg = _config()
        _GRADS[(dtype, case)] = bench_clip.make_grads(bench_clip.make_case(case), dtype, cfg.device, cfg.seed)
    return _GRADS[(dtype, case)]


def pytest_generate_tests(metafunc):
    if "clip_case" not in metafunc.fixturenames:
        return
    cfg = _config()
    cases = [(d, c, v) for d in cfg.dtypes for c in cfg.cases for v in cfg.variants]
    metafunc.parametrize("clip_case", cases, ids=[f"{c}-{d}-{v}" for d, c, v in cases])


def test_clip_grad_norm(benchmark, bench_rounds, clip_case):
    cfg = _config()
    dtype, case_name, variant = clip_case
    case = bench_clip.make_case(case_name)
    grads = _grads(dtype, case_name)
    fn = bench_clip.make_variant(variant, cfg.backend)
    info = {"device": device_name(cfg.device), "versions": versions(), "dtype": dtype,
            "case": case_name, "variant": variant, "tensors": case.tensors, "elements": case.elements,
            "grad_bytes": case.grad_bytes(dtype), "max_norm": grads.max_norm, "clip_coef": grads.clip_coef}
    if variant != "torch":
        info.update(bench_clip.check_variant(fn, grads, strict=variant == "cnnperf"))
        assert info["check"] == "ok", info["check"]

    def restore():
        grads.restore()
        synchronize(cfg.device)

    def timed():
        fn(grads.params, grads.max_norm)
        synchronize(cfg.device)

    restore()
    timed()  # compiles the Triton kernels, caches cnnperf's device table
    benchmark.pedantic(timed, setup=restore, rounds=bench_rounds, warmup_rounds=2, iterations=1)
    grads.restore()

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        info.update(median_ms=median_s * 1e3, gbps=bench_clip.achieved_gbps(case.grad_bytes(dtype), median_s * 1e3))
    benchmark.extra_info.update(info)
