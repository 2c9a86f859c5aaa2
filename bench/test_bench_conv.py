"""conv2d + bias + ReLU under pytest-benchmark: one case per shape x pass x variant.

Run with ``pytest bench/ --benchmark-only`` (add ``--benchmark-json=PATH`` to keep a record). Cases and options
are those of ``cnnperf bench`` (see conftest.py). pytest-benchmark times with a host clock, so every timed
call ends with a device synchronisation; ``cnnperf bench`` (CUDA events through do_bench) is the reference
for GPU numbers, this is for pytest-benchmark's comparison and history tooling.
"""

from cnnperf._timing import synchronize
from cnnperf.benchmarks import conv as bench


def test_conv_bias_relu(benchmark, bench_config, bench_rounds, bench_case):
    cfg = bench_config
    shape, pass_, variant = bench_case
    sets = bench.input_sets(cfg, shape, pass_)
    fn = bench.make_variant(variant, shape, cfg.compile_mode, cfg.backend)
    info = {**bench.row_context(cfg), **shape.fields(), "pass": pass_, "variant": variant}
    if variant == "cnnperf":
        info.update(bench.check_cnnperf(fn, shape, pass_, sets[0]))
        assert info["check"] == "ok", info["check"]

    call = bench.make_call(fn, pass_, sets)

    def timed():
        call()
        synchronize(cfg.device)

    timed()  # compiles (torch.compile, Triton autotuning) outside the measurement
    setup = (lambda: bench.clear_grads(sets)) if pass_ == "fwdbwd" else None
    benchmark.pedantic(timed, setup=setup, rounds=bench_rounds, warmup_rounds=2, iterations=1)

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        info.update(median_ms=median_s * 1e3, tflops=shape.flops(pass_) / median_s / 1e12)
    benchmark.extra_info.update(info)
