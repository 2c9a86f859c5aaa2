"""ResNet training steps with the fused Conv -> BatchNorm -> ReLU blocks, against eager and torch.compile.

    python bench/bench_train_step.py --device cuda --json bench_train_step.json          # ResNet-50, batch 64
    python bench/bench_train_step.py --models resnet18 --image-size 32 --batch-size 8 --rounds 3   # the CPU

Each variant is the model in bf16 autocast and channels_last, SGD with momentum, one fixed random batch (no
data loading), prepared afresh from the same weights by the profiler's ``variants.prepare``:

- ``eager``: torchvision's model as it is (cuDNN convolutions, BatchNorm's and ReLU's kernels);
- ``fused``: ``cnnperf.fuse`` in training mode (each Conv2d -> BatchNorm2d -> ReLU one FusedConv2dBatchNormReLU;
  the fused kernels' choice per shape follows ``CNNPERF_BACKEND``, ``auto`` by default: Triton or the reference
  ops, whichever was faster when first timed);
- ``compile``: ``torch.compile`` of the eager model (default mode);
- ``fused+compile`` (``--variants``): both.

After a warm-up block each (compiles, the kernels' JIT and the ``auto`` timings happen there), the variants
train in interleaved rounds (A/B/C, the order rotating every round, so that a drift in the machine's speed hits
all alike) of ``--block-steps`` steps, synchronised at the blocks' ends. Reported per variant: the median
block time per step with its 20/80 % quantiles, and its speed-up over ``eager`` and over ``compile`` as the
median of the rounds' ratios with their 20/80 % quantiles; on a GPU the peak memory of its steps. The record
(device, versions, argv, per-round times, how many blocks fused, the ``auto`` choices) goes to ``--json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

from cnnperf import _env, _io, _terminal, _timing
from cnnperf.fusion import REPORT_ATTRIBUTE
from cnnperf.profiler import measure, variants

VARIANTS = {"eager": ("bf16", "channels_last"), "fused": ("bf16", "channels_last", "fuse"),
            "compile": ("bf16", "channels_last", "compile"),
            "fused+compile": ("bf16", "channels_last", "fuse", "compile")}
DEFAULT_VARIANTS = ("eager", "fused", "compile")


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.01, momentum=0.9)


def _block(prep, x, y, steps: int) -> float:
    """Seconds per step of ``steps`` training steps under the variant's switches, synchronised at the ends."""
    with variants.global_switches(prep.options, prep.device), variants.compile_config(prep.options):
        return measure.plain_steps_s(prep, F.cross_entropy, x, y, steps)


def _ratios(a: list[float], b: list[float]) -> dict:
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "q20_q80": _timing.p20_p80(ratios)}


def measure_model(name: str, names, device: torch.device, batch: int, image_size: int, rounds: int,
                  block_steps: int) -> dict:
    torch.manual_seed(0)
    template = getattr(torchvision.models, name)(weights=None, num_classes=1000).train()
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 1000, (batch,))
    preps = {v: variants.prepare(VARIANTS[v], template, _sgd, device) for v in names}
    row = {"model": name, "batch": batch, "image_size": image_size, "rounds": rounds, "block_steps": block_steps,
           "variants": {}}
    report = getattr(preps.get("fused", preps.get("fused+compile")).module, REPORT_ATTRIBUTE, None) \
        if any(v.startswith("fused") for v in names) else None
    if report is not None:
        row["fused_layers"] = len(report.fused)
        row["fused_batch_norms"] = len(report.batch_norm)
    warm = {}
    for v, prep in preps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        _block(prep, x, y, 2)
        warm[v] = time.perf_counter() - start
        print(f"{name} {v}: warm-up {warm[v]:.1f} s", file=sys.stderr, flush=True)
        row["variants"][v] = {"options": list(VARIANTS[v]), "warmup_s": round(warm[v], 2),
                              "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                                  if device.type == "cuda" else None)}
    times: dict[str, list[float]] = {v: [] for v in preps}
    order = list(preps)
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            times[v].append(_block(preps[v], x, y, block_steps))
    for v, t in times.items():
        cell = row["variants"][v]
        cell.update(ms_per_step=statistics.median(t) * 1e3, ms_q20_q80=_timing.p20_p80(t, scale=1e3),
                    round_ms=[s * 1e3 for s in t])
        for base in ("eager", "compile"):
            if base in times and base != v:
                cell[f"speedup_vs_{base}"] = _ratios(times[base], t)
    if "fused" in names:
        from cnnperf.ops import conv_bias_relu

        choices = [path for key, path in conv_bias_relu._auto_choice.items() if str(key[0]).startswith("bn_")]
        row["auto_choices"] = {p: choices.count(p) for p in set(choices)}
    return row


def print_table(record: dict, console) -> None:
    heads = [("model", "left"), ("variant", "left"), ("ms/step", "right"), ("p20-p80", "right"),
             ("vs eager", "right"), ("vs compile", "right"), ("peak GiB", "right"), ("warm-up s", "right")]

    def speed(cell, base):
        s = cell.get(f"speedup_vs_{base}")
        return "-" if s is None else f"{s['median']:.2f}x [{s['q20_q80'][0]:.2f}-{s['q20_q80'][1]:.2f}]"

    rows = []
    for r in record["rows"]:
        for v, c in r["variants"].items():
            low, high = c["ms_q20_q80"]
            peak = "-" if c["peak_memory_gib"] is None else f"{c['peak_memory_gib']:.2f}"
            rows.append(([r["model"], v, f"{c['ms_per_step']:.1f}", f"{low:.1f}-{high:.1f}", speed(c, "eager"),
                          speed(c, "compile"), peak, f"{c['warmup_s']:.1f}"], None))
    _terminal.print_table(console, heads, rows, optional=("warm-up s", "peak GiB", "p20-p80"),
                          title="Training step, bf16 autocast, channels_last (speed-ups: median of the rounds' "
                                "ratios, p20-p80 after it)")
    for r in record["rows"]:
        if "fused_layers" in r:
            console.print(f"{r['model']}: {r['fused_layers']} layers fused, {r['fused_batch_norms']} with their "
                          f"BatchNorm; auto choices of the fused Conv-BN-ReLU op: {r.get('auto_choices') or '-'}",
                          markup=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50", help="comma-separated torchvision models (default resnet50)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-steps", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new model after S seconds (the record keeps what was measured)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default=None, metavar="PATH", help="write the record here (rewritten per model)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "eager" not in names:
        p.error(f"--variants: {', '.join(unknown) or 'eager is needed (the baseline)'}; choose from "
                f"{', '.join(VARIANTS)}")
    if min(args.batch_size, args.image_size, args.rounds, args.block_steps) < 1:
        p.error("--batch-size, --image-size, --rounds and --block-steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    console = _terminal.make_console()
    start = time.perf_counter()
    record = {**_env.record_header("bench_train_step", device), "argv": sys.argv[1:] if argv is None else list(argv),
              "rows": []}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            console.print(f"{model}: not measured, the time budget ({args.time_budget:.0f} s) is spent", markup=False)
            break
        record["rows"].append(measure_model(model, names, device, args.batch_size, args.image_size, args.rounds,
                                            args.block_steps))
        if args.json:
            _io.write_json_atomic(args.json, _io.jsonable(record))
    print_table(record, console)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
