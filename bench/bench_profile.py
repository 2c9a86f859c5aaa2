"""What the profiler costs and what it finds: the instrumented step's overhead, and a whole cnnperf.profile run.

    python bench/bench_profile.py                                   # convnet on the CPU (about a minute)
    python bench/bench_profile.py --models convnet,resnet18 --device cuda --json bench_profile.json
    python bench/bench_profile.py --models resnet18 --variants channels_last,bf16   # CPU: several minutes

Cases: the doctor's default ConvNet (1x28x28 digits-sized images, batch 64, Adam), ResNet-18 (CIFAR stem,
3x32x32, batch 32, Adam) and VGG-11-BN at a quarter of the channels (``vgg11_small``, 3x32x32, batch 32, Adam),
each trained on one fixed random batch (no data loading). ``--models`` chooses; the default is the ConvNet and
ResNet-18 on a GPU and the ConvNet alone on the CPU, where a ResNet-18 step takes seconds and one profile of it
minutes (ask for the others with ``--models convnet,resnet18,vgg11_small``).

1. Instrumentation overhead. One variant built by ``variants.prepare((), ...)`` (eager float32) trains in
   alternating blocks of ``--block-steps`` steps (the order within a pair alternates too, so that a drift in the
   machine's speed hits both alike): (a) a plain loop of ``forward_loss``, ``backward``, ``optimizer_step``;
   (b) ``measure.timed_steps`` (the profiler's step: a "data" phase taking the batch from its source, NVTX and
   record_function ranges around the phases, CUDA events or ``perf_counter`` marks at their boundaries, and
   the per-step durations computed at the end). Both arms run the same model and optimizer, so they do the
   same work; both are synchronised only at the block's ends (the plain loop by a device sync, timed_steps by
   its own sync after its last step), and a block's time is its wall time divided by its steps. The overhead
   is the ratio of the median block times, minus 1. On a CPU its true value is far below the run-to-run noise
   of a step, so the same A/B is also run on a one-layer model (``Linear(16, 10)``, batch 8; steps of a fraction of a
   millisecond; on the CPU with one intra-op thread, since what is measured is host code and a second thread
   only adds OpenMP waits to ops this small on a busy machine): its difference per step is the bookkeeping's
   cost, reported in microseconds and as a share of the case's plain step ("direct").
2. The profiler's own cost and what it finds. The wall time of ``cnnperf.profile(model, F.cross_entropy,
   batch, Adam, variants=..., steps=..., batch_sizes=None, top_ops=False)`` (no batch-size sweep, no top ops:
   the search, the numerical checks and the confirmation), also in plain steps of the case; the recommended
   variant, its speed-up in the search and in the confirmation (the baseline and the variant timed again in
   turns), and every variant's median, quantiles, speed-up and check. ``--variants`` is passed through
   ("default": the profiler's own default). Without it: the profiler's default on a GPU; on the CPU that
   default minus ``compile`` (torch.compile takes tens of seconds per variant on this kind of machine, which
   would be most of the run; name it to include it).

3. An independent A/B of the profile's headline: after the profile, ``eager`` and the recommended variant are
   prepared afresh (``variants.prepare``) and train in alternating blocks of plain steps (at least 11 pairs and
   6 s, as long as the profiler's confirmation: see AB_MIN_S; the order alternating within pairs, the variant
   under its own switches); the median of the pairs' ratios (as the headline is the median of the rounds'
   ratios), with their p20-p80, against the headline: ``headline_over_ab`` (issue 14's bar: within +-20 %). Not
   run when the profile keeps eager.

On the CPU the whole run fixes glibc malloc's mmap and trim thresholds first (``cnnperf._malloc``; the record's
``malloc``): with the default, adapting threshold the same variant's step time depends on the process's
allocation history (a kept copy 12 ms, a fresh one 8 ms later in the same process), and the headline and the
A/B, timed seconds apart, disagreed by up to 1.6x (0.63-1.26 in eight default runs); with the thresholds fixed,
eight default runs gave 0.81-1.16, every one recommending bf16+channels_last (headlines 1.92-2.23x).

Timings on a shared CPU are noisy: read the quantiles and the per-block times before a median. The record
(device, versions, time, argv, and per case the medians, 20/80 % quantiles, per-block times and the profile's
results) is printed as tables and written as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import cnnperf
from cnnperf import _env, _io, _malloc, _terminal, _timing
from cnnperf._format import finite, fmt
from cnnperf.profiler import measure, variants
from cnnperf.profiler.variants import DEFAULT_EXCLUDED_ON_CPU, OPTIONS
from cnnperf.zoo.models import build_model

CASES = {  # name -> (model, in_channels, image_size, batch)
    "convnet": ("convnet", 1, 28, 64),
    "resnet18": ("resnet18", 3, 32, 32),
    "vgg11_small": ("vgg11_small", 3, 32, 32),
}
DEFAULT_MODELS = {"cpu": "convnet", "cuda": "convnet,resnet18"}
# (case, device type) -> (alternating block pairs, steps per block, timed steps per profiled variant)
DEFAULTS = {
    ("convnet", "cpu"): (30, 10, 20),
    ("resnet18", "cpu"): (3, 2, 4),
    ("vgg11_small", "cpu"): (10, 5, 10),
    ("vgg11_small", "cuda"): (30, 20, 20),
    ("convnet", "cuda"): (30, 20, 20),
    ("resnet18", "cuda"): (30, 20, 20),
}
WARMUP_STEPS = 3  # plain steps and timed_steps warm-up before the blocks: allocator, kernels, Adam's state
TINY_BLOCKS, TINY_BLOCK_STEPS = 30, 100  # the one-layer A/B: 30 pairs of 100 steps


def _adam(parameters):
    return torch.optim.Adam(parameters, lr=1e-3)


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=1e-2)


def _timed_block(prep, source, steps: int) -> tuple[float, measure.StepTimes]:
    """Seconds per step of one ``timed_steps`` call (no warm-up: it syncs before its first step and after its
    last one), and what it measured."""
    _timing.synchronize(prep.device)
    start = time.perf_counter()
    times = measure.timed_steps(prep, F.cross_entropy, source, steps, 0)
    return (time.perf_counter() - start) / steps, times


def ab_blocks(prep, batch, blocks: int, block_steps: int) -> dict:
    """Alternating blocks, plain and timed_steps, on one prepared variant; see the module docstring."""
    x, y = batch
    source = measure.batch_source(prep, batch)
    for _ in range(WARMUP_STEPS):
        measure.plain_steps_s(prep, F.cross_entropy, x, y, 1)
    measure.timed_steps(prep, F.cross_entropy, source, 1, WARMUP_STEPS)
    block_s = {"plain": [], "timed": []}
    reported, phases = [], {name: [] for name in measure.PHASES}
    for b in range(blocks):
        for key in (("plain", "timed") if b % 2 == 0 else ("timed", "plain")):
            if key == "plain":
                block_s["plain"].append(measure.plain_steps_s(prep, F.cross_entropy, x, y, block_steps))
                continue
            per_step, times = _timed_block(prep, source, block_steps)
            block_s["timed"].append(per_step)
            reported += times.steps
            for name, values in times.phases.items():
                phases[name] += values
    med = statistics.median
    plain_s, timed_s = med(block_s["plain"]), med(block_s["timed"])
    return {"blocks": blocks, "block_steps": block_steps,
            "step_ms_plain": plain_s * 1e3, "step_ms_timed": timed_s * 1e3,
            "step_ms_plain_q20_q80": _timing.p20_p80(block_s["plain"], scale=1e3),
            "step_ms_timed_q20_q80": _timing.p20_p80(block_s["timed"], scale=1e3),
            "overhead_ab": timed_s / plain_s - 1, "overhead_ms_per_step": (timed_s - plain_s) * 1e3,
            # what timed_steps itself reports (its marks, per step; on a GPU between CUDA events)
            "reported_step_ms": med(reported), "reported_step_ms_q20_q80": _timing.p20_p80(reported),
            "reported_phases_ms": {name: med(v) for name, v in phases.items()},
            "block_ms_plain": [t * 1e3 for t in block_s["plain"]],
            "block_ms_timed": [t * 1e3 for t in block_s["timed"]]}


def bookkeeping(device: torch.device, blocks: int, block_steps: int) -> dict:
    """The same A/B on ``Linear(16, 10)`` with batch 8 and SGD: per step, timed_steps' bookkeeping in
    microseconds (its phases, ranges and marks), measured where the model's own step is well under a millisecond."""
    torch.manual_seed(0)
    template = torch.nn.Linear(16, 10)
    prep = variants.prepare((), template, _sgd, device)
    batch = (torch.randn(8, 16, device=device), torch.randint(10, (8,), device=device))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # host code is measured; a 2nd thread only adds OpenMP waits to ops this small
    try:
        ab = ab_blocks(prep, batch, blocks, block_steps)
    finally:
        torch.set_num_threads(threads)
    return {"model": "Linear(16, 10)", "input": [8, 16], "optimizer": "sgd", "blocks": blocks,
            "threads": 1 if device.type == "cpu" else threads,
            "block_steps": block_steps, "step_us_plain": ab["step_ms_plain"] * 1e3,
            "step_us_timed": ab["step_ms_timed"] * 1e3, "us_per_step": ab["overhead_ms_per_step"] * 1e3,
            "step_us_plain_q20_q80": [v * 1e3 for v in ab["step_ms_plain_q20_q80"]],
            "step_us_timed_q20_q80": [v * 1e3 for v in ab["step_ms_timed_q20_q80"]],
            "block_us_plain": [v * 1e3 for v in ab["block_ms_plain"]],
            "block_us_timed": [v * 1e3 for v in ab["block_ms_timed"]]}


def profile_case(template, batch, device: torch.device, requested, steps: int, log) -> dict:
    """One ``cnnperf.profile`` run, timed from the outside; its recommendation and every variant's numbers."""
    start = time.perf_counter()
    result = cnnperf.profile(template, F.cross_entropy, batch, _adam, variants=requested, steps=steps,
                             batch_sizes=None, top_ops=False, device=device, log=log)
    wall = time.perf_counter() - start
    record = result.record
    rec = record.get("recommendation") or {}
    confirmation = rec.get("confirmation")
    rows = []
    for row in result.variants:
        check = row.get("check")
        rows.append({key: row.get(key) for key in ("name", "stage", "status", "median_ms", "p20_ms", "p80_ms",
                                                   "timed_steps", "speedup", "setup_s", "compile_s",
                                                   "phases_ms", "error", "reason")}
                    | {"check": None if check is None else {k: check.get(k) for k in (
                        "passed", "loss_err", "grad_err", "precision")}})
    return {"variants_requested": record["run"].get("variants_requested"), "steps": steps,
            "warmup": record["run"].get("warmup"), "check_steps": record["run"].get("check_steps"),
            "wall_s": wall, "elapsed_s": record["run"].get("elapsed_s"),
            "measured": sum(r["status"] == "ok" for r in rows), "recommended": result.recommended,
            "speedup": result.speedup, "confirmation": confirmation,
            "confirmed_speedup": confirmation["speedup"] if confirmation else None,
            "summary": rec.get("summary"), "variants": rows}


# The independent A/B: eager / recommended pairs, at least AB_BLOCK_PAIRS and for AB_MIN_S seconds (at most
# AB_MAX_PAIRS): as long as the profiler's confirmation, so that both span the machine's phases of seconds (see
# cnnperf.profiler.core.CONFIRM_MIN_S) rather than each catching one.
AB_BLOCK_PAIRS = 11
AB_MIN_S = 6.0
AB_MAX_PAIRS = 200


def independent_ab(template, batch, device: torch.device, name: str, pairs: int, block_steps: int) -> dict:
    """eager against the variant ``name`` in alternating blocks of plain steps, each prepared afresh."""
    x, y = batch
    preps = {"eager": variants.prepare((), template, _adam, device),
             name: variants.prepare(variants.parse_variant(name), template, _adam, device)}
    block_s: dict[str, list[float]] = {k: [] for k in preps}

    def block(key: str, steps: int) -> float:
        with variants.global_switches(preps[key].options, device), variants.compile_config(preps[key].options):
            return measure.plain_steps_s(preps[key], F.cross_entropy, x, y, steps)

    for key in preps:
        block(key, WARMUP_STEPS)
    start, b = time.perf_counter(), 0
    while b < pairs or (time.perf_counter() - start < AB_MIN_S and b < AB_MAX_PAIRS):
        for key in (("eager", name) if b % 2 == 0 else (name, "eager")):
            block_s[key].append(block(key, block_steps))
        b += 1
    med = statistics.median
    ratios = [e / v for e, v in zip(block_s["eager"], block_s[name])]
    # The median of the pairs' ratios, as the profiler's headline is the median of its rounds' ratios.
    return {"variant": name, "pairs": b, "seconds": time.perf_counter() - start, "block_steps": block_steps,
            "eager_ms": med(block_s["eager"]) * 1e3, "variant_ms": med(block_s[name]) * 1e3,
            "speedup": med(ratios), "speedup_q20_q80": _timing.p20_p80(ratios),
            "speedup_of_medians": med(block_s["eager"]) / med(block_s[name])}


def measure_case(case: str, device: torch.device, blocks: int, block_steps: int, requested, profile_steps: int,
                 log) -> dict:
    name, channels, size, batch_size = CASES[case]
    torch.manual_seed(0)
    template = build_model(name, in_channels=channels, num_classes=10, image_size=size)
    batch = (torch.randn(batch_size, channels, size, size, device=device),
             torch.randint(10, (batch_size,), device=device))
    prep = variants.prepare((), template, _adam, device)
    overhead = ab_blocks(prep, batch, blocks, block_steps)
    del prep
    prof = profile_case(template, batch, device, requested, profile_steps, log)
    prof["wall_in_plain_steps"] = prof["wall_s"] / (overhead["step_ms_plain"] / 1e3)
    ab = None
    if prof["recommended"] != "eager":
        ab = independent_ab(template, batch, device, prof["recommended"], AB_BLOCK_PAIRS, block_steps)
        ab["headline_over_ab"] = prof["speedup"] / ab["speedup"] if prof["speedup"] else None
    return {"case": case, "model": name, "input": [batch_size, channels, size, size], "optimizer": "adam",
            "parameters": sum(p.numel() for p in template.parameters()), "overhead": overhead, "profile": prof,
            "independent_ab": ab}


def default_variants(device: torch.device):
    """The profiler's default variants, minus compile on the CPU (see the module docstring)."""
    if device.type == "cuda":
        return None
    return [o for o in OPTIONS if o not in DEFAULT_EXCLUDED_ON_CPU and o != "compile"]


def _fmt(value, spec: str) -> str:
    return fmt(value, spec) if finite(value) is not None else "-"


def _pct(value, spec: str) -> str:
    return "-" if value is None else format(100 * value, spec) + "%"


def print_tables(record: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    tiny = record["bookkeeping"]
    table = Table(title=f"timed_steps vs a plain step loop on {escape(record['device'])} (median of alternating "
                        "blocks; q20-q80 in brackets)")
    for col in ("case", "input", "blocks x steps", "plain ms/step", "timed_steps ms/step", "overhead A/B",
                "ms/step", "direct", "timed_steps reports"):
        table.add_column(col, justify="left" if col in ("case", "input") else "right")
    for row in record["rows"]:
        o = row["overhead"]
        pq, tq = o["step_ms_plain_q20_q80"], o["step_ms_timed_q20_q80"]
        table.add_row(row["case"], "x".join(map(str, row["input"])), f"{o['blocks']} x {o['block_steps']}",
                      f"{o['step_ms_plain']:.3f} [{pq[0]:.3f}-{pq[1]:.3f}]",
                      f"{o['step_ms_timed']:.3f} [{tq[0]:.3f}-{tq[1]:.3f}]", f"{100 * o['overhead_ab']:+.2f}%",
                      f"{o['overhead_ms_per_step']:+.3f}", _pct(o["overhead_direct"], ".3f"),
                      _fmt(o["reported_step_ms"], ".3f"))
    console.print(table)
    console.print(f"bookkeeping on {tiny['model']} (batch 8, {tiny['blocks']} x {tiny['block_steps']} steps): "
                  f"plain {tiny['step_us_plain']:.1f} us/step, timed_steps {tiny['step_us_timed']:.1f} us/step: "
                  f"{tiny['us_per_step']:+.1f} us per step (\"direct\" above: that over the case's plain step)")
    for row in record["rows"]:
        p = row["profile"]
        table = Table(title=f"cnnperf.profile on {row['case']} {'x'.join(map(str, row['input']))}: "
                            f"{p['wall_s']:.1f} s wall = {p['wall_in_plain_steps']:.0f} plain steps, "
                            f"{p['measured']} variants measured, {p['steps']} timed steps each")
        for col in ("variant", "stage", "status", "median ms", "p20-p80 ms", "steps", "speed-up", "check"):
            table.add_column(col, justify="left" if col in ("variant", "stage", "status", "check") else "right")
        for v in p["variants"]:
            check = v["check"]
            verdict = ("-" if check is None else "[green]ok[/]" if check["passed"] else
                       f"[red]off[/] (grad {_fmt(check['grad_err'], '.2g')})")
            status = v["status"] if v["status"] == "ok" else f"[yellow]{v['status']}[/]"
            speed = v["speedup"]
            table.add_row(escape(v["name"]) + (" [bold]*[/]" if v["name"] == p["recommended"] else ""), v["stage"],
                          status, _fmt(v["median_ms"], ".3f"),
                          "-" if v["p20_ms"] is None else f"{v['p20_ms']:.3f}-{v['p80_ms']:.3f}",
                          _fmt(v["timed_steps"], "d"),
                          "-" if speed is None else f"[{'green' if speed >= 1 else 'red'}]{speed:.2f}x[/]", verdict)
        console.print(table)
        conf = p["confirmation"]
        search = next((v["speedup"] for v in p["variants"] if v["name"] == p["recommended"]), None)
        console.print(f"recommended [bold]{escape(p['recommended'])}[/]: headline {_fmt(p['speedup'], '.2f')}x; "
                      f"{_fmt(search, '.2f')}x in the search"
                      + (f", {conf['speedup']:.2f}x in the confirmation ({conf['rounds']} rounds of "
                         f"{conf['steps']} steps: {conf['baseline_ms']:.3f} -> {conf['variant_ms']:.3f} ms)"
                         if conf else ", no confirmation run"))
        ab = row.get("independent_ab")
        if ab:
            q = ab["speedup_q20_q80"]
            console.print(f"independent A/B ({ab['pairs']} pairs of {ab['block_steps']} plain steps): eager "
                          f"{ab['eager_ms']:.3f} -> {ab['variant_ms']:.3f} ms/step, {ab['speedup']:.2f}x "
                          f"[{q[0]:.2f}-{q[1]:.2f}]; headline / A/B = {_fmt(ab['headline_over_ab'], '.3f')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None,
                   help="comma-separated: " + ", ".join(CASES) + " (default: convnet on the CPU, both on a GPU)")
    p.add_argument("--blocks", type=int, default=None,
                   help="alternating block pairs per model (default: 30, but 3 for resnet18 on the CPU)")
    p.add_argument("--block-steps", type=int, default=None,
                   help="steps per block (default: 10 convnet, 2 resnet18 on the CPU; 20 on a GPU)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="timed steps per variant in the profile (default: 20; 4 for resnet18 on the CPU)")
    p.add_argument("--variants", default=None,
                   help="passed to cnnperf.profile ('default': its own default; without this option: that "
                        "default, minus compile on the CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--verbose", action="store_true", help="print the profiler's progress lines")
    p.add_argument("--json", default=None, metavar="PATH", help="write the record here")
    args = p.parse_args(argv)
    for flag in ("blocks", "block_steps", "profile_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < (2 if flag == "profile_steps" else 1):
            p.error(f"--{flag.replace('_', '-')} must be at least {2 if flag == 'profile_steps' else 1}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    malloc = _malloc.fix_mmap_threshold() if device.type == "cpu" else None
    cases = [c.strip() for c in (args.models or DEFAULT_MODELS[device.type]).split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    requested = (default_variants(device) if args.variants is None else
                 None if args.variants == "default" else args.variants)
    log = (lambda line: print(f"  profile: {line}", file=sys.stderr, flush=True)) if args.verbose else None
    console = _terminal.make_console()

    start = time.perf_counter()
    tiny = bookkeeping(device, TINY_BLOCKS, TINY_BLOCK_STEPS)
    console.print(f"bookkeeping: {tiny['us_per_step']:+.1f} us per step", highlight=False)
    rows = []
    for case in cases:
        blocks, block_steps, profile_steps = DEFAULTS[(case, device.type)]
        row = measure_case(case, device, args.blocks or blocks, args.block_steps or block_steps, requested,
                           args.profile_steps or profile_steps, log)
        row["overhead"]["overhead_direct"] = tiny["us_per_step"] / 1e3 / row["overhead"]["step_ms_plain"]
        rows.append(row)
        o, pr = row["overhead"], row["profile"]
        console.print(f"{case}: plain {o['step_ms_plain']:.3f} ms/step, timed_steps {o['step_ms_timed']:.3f} "
                      f"ms/step ({100 * o['overhead_ab']:+.2f}%); profile {pr['wall_s']:.1f} s -> "
                      f"{pr['recommended']} {_fmt(pr['speedup'], '.2f')}x ("
                      + ("no confirmation" if pr["confirmed_speedup"] is None else
                         f"confirmed {pr['confirmed_speedup']:.2f}x") + ")", highlight=False)
    record = {**_env.record_header("bench_profile", device), "variants_requested": requested, "malloc": malloc,
              "wall_s": time.perf_counter() - start, "bookkeeping": tiny, "rows": rows}
    record = _io.jsonable(record)  # strict JSON: NaN and inf become null
    print_tables(record, console)
    if args.json:
        _io.write_json_atomic(args.json, record)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
