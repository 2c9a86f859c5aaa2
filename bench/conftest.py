"""pytest-benchmark set-up for ``pytest bench/ --benchmark-only``.

The cases come from the same configuration as ``cnnperf bench``: ``--bench-args`` takes that command's options
(e.g. ``--bench-args="--model resnet50 --limit 4 --variants eager,cnnperf"``), so both tools share one set of
defaults: the full ResNet-50 and VGG-16 shapes on a GPU, the reduced ``--quick`` set on the CPU.
"""

import shlex

import pytest

from cnnperf._cli import UsageError
from cnnperf.benchmarks import conv as bench


def pytest_addoption(parser):
    group = parser.getgroup("cnnperf bench")
    group.addoption("--bench-args", default="", metavar="OPTIONS",
                    help="options of `cnnperf bench` choosing shapes, passes, variants, dtype, device "
                         "(default: its defaults for this machine)")
    group.addoption("--bench-rounds", type=int, default=None, metavar="N",
                    help="timed rounds per case (default: 20 on a GPU, 5 with --quick)")


def _config(config) -> bench.Config:
    try:
        args = bench.build_parser().parse_args(shlex.split(config.getoption("--bench-args")))
        return bench.resolve_config(args)
    except UsageError as e:
        raise pytest.UsageError(f"--bench-args: {e}") from None


def pytest_configure(config):
    config._cnnperf_bench = None  # resolved lazily: collecting tests/ alone must not build the models


def _cached_config(config) -> bench.Config:
    if config._cnnperf_bench is None:
        config._cnnperf_bench = _config(config)
    return config._cnnperf_bench


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cfg = _cached_config(metafunc.config)
    cases = [(shape, pass_, variant) for shape in cfg.shapes() for pass_ in cfg.passes for variant in cfg.variants]
    metafunc.parametrize("bench_case", cases, ids=[f"{s.name}-{p}-{v}" for s, p, v in cases])


@pytest.fixture(scope="session")
def bench_config(request) -> bench.Config:
    return _cached_config(request.config)


@pytest.fixture(scope="session", autouse=True)
def _cudnn_benchmark(bench_config):
    """cuDNN algorithm search on or off for the whole session, as ``cnnperf bench`` sets it for a run."""
    import torch

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bench_config.cudnn_benchmark
    yield
    torch.backends.cudnn.benchmark = previous


@pytest.fixture(scope="session")
def bench_rounds(request, bench_config) -> int:
    return request.config.getoption("--bench-rounds") or (5 if bench_config.quick else 20)
