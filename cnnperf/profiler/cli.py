"""``cnnperf profile``: measure which speed-ups make a model train faster here, recommend and report. With no
arguments: the zoo's ConvNet on scikit-learn's digits (batch 64, Adam) on the CPU, or ResNet-18 on CIFAR-shaped
random data when a GPU is present; the record goes to ``./profile-out/profile.json`` and ``report.html``, a
summary to the terminal. Under ``torchrun`` (WORLD_SIZE > 1) every rank joins the process group (NCCL on GPUs,
gloo on CPUs), wraps the model in DistributedDataParallel and reads its shard of the data; all ranks measure,
rank 0 writes. Exit status: 0 after a run (whatever it recommends), 1 when the baseline step itself fails, 2 for a
bad argument (one line on stderr), 130 after Ctrl-C (the report of what was measured is still written). Imports
:mod:`cnnperf._cli`, the zoo and the profiler's core, report and variants.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnnperf import _cli, _terminal
from cnnperf.profiler.policy import DEFAULT_BUDGET_S

DEFAULT_OUT = "profile-out"
DEFAULT_BATCH_SIZE = 64
DEFAULT_MODEL = {"cpu": ("convnet", "digits"), "cuda": ("resnet18", "fake")}


def _check_out(out: Path) -> None:
    """``--out`` can be a folder for the reports: an existing, writable folder, or a new one under the nearest
    existing folder, writable (checked before anything is measured; created once the data loaded)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable" if existing == out
                         else f"--out {out}: cannot create it under {existing} (not writable)")


def _batch_sizes(text: str):
    if text in ("auto", "none"):
        return text if text == "auto" else None
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"must be auto, none or a comma list of positive integers, got {text!r}")
    return sizes


def _variants(text: str):
    from cnnperf.profiler.variants import VariantError, parse_variant

    if text in ("all", "default"):
        return None if text == "default" else "all"
    names = [t.strip() for t in text.split(",") if t.strip()]
    try:
        for name in names:
            parse_variant(name)
    except VariantError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("an empty list")
    return names


def build_parser() -> argparse.ArgumentParser:
    from cnnperf.profiler.core import DEFAULT_STEPS, DEFAULT_WARMUP
    from cnnperf.profiler.variants import OPTIONS
    from cnnperf.zoo.data import DATASETS
    from cnnperf.zoo.models import MODELS
    from cnnperf.zoo.optim import OPTIMIZERS

    p = _cli.Parser(prog="cnnperf profile",
                    description="Measure AMP, channels_last, torch.compile, TF32, cudnn.benchmark, cnnperf's fused "
                                "layers, DataLoader workers and their combinations side by side on one model; "
                                "recommend the fastest that is numerically sound.",
                    epilog="Options: " + "; ".join(f"{o.name}: {o.what}" for o in OPTIONS.values()))
    p.add_argument("--model", choices=MODELS, default=None,
                   help="the model (default: convnet on the CPU, resnet18 on a GPU)")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="the data set (default: digits on the CPU, fake CIFAR-shaped data on a GPU)")
    p.add_argument("--data-root", type=_cli.existing_dir, metavar="DIR",
                   help="where MNIST/CIFAR-10 are, or the image folder")
    p.add_argument("--batch-size", type=_cli.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="batch size per process (default: %(default)s)")
    p.add_argument("--steps", type=_cli.at_least(2, " (a median of one step is no measurement)"),
                   default=DEFAULT_STEPS, help="timed training steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=_cli.nonnegative_int, default=DEFAULT_WARMUP,
                   help="untimed steps before them (default: %(default)s)")
    p.add_argument("--device", type=_cli.device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--variants", type=_variants, default=None, metavar="LIST",
                   help="options or variants to measure, comma separated (e.g. bf16,channels_last or "
                        "bf16+compile), 'all', or 'default': every option that applies here, except "
                        "max_autotune on the CPU")
    p.add_argument("--budget", type=_cli.positive_float, default=None, metavar="SECONDS",
                   help="no new variant starts after this many seconds (default: "
                        + ", ".join(f"{v:g} on {k}" for k, v in DEFAULT_BUDGET_S.items()) + ")")
    p.add_argument("--batch-sizes", type=_batch_sizes, default="auto", metavar="LIST",
                   help="batch-size sweep of the recommended variant: auto (doubling until out of memory or "
                        "flat), none, or a comma list")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer (default: %(default)s)")
    p.add_argument("--lr", type=_cli.positive_float, default=None,
                   help="learning rate (default: the optimizer's default)")
    p.add_argument("--workers", type=_cli.nonnegative_int, default=0,
                   help="DataLoader workers of the baseline (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where profile.json and report.html go (default: ./%(default)s)")
    p.add_argument("--trace", action="store_true",
                   help="also write DIR/trace.json: a Chrome/Perfetto trace of steps of the recommended variant")
    p.add_argument("--quiet", action="store_true", help="only the recommendation line")
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run("cnnperf profile", argv, parse, _run, interrupted="interrupted before any measurement")


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, checked: UsageError naming the option for anything that cannot run here."""
    args = build_parser().parse_args(argv)
    if args.device is not None:
        _cli.check_device(args.device)
    return args


def _run(args) -> int:
    import functools

    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from cnnperf.profiler import report
    from cnnperf.profiler.core import ProfileError, ProfileInterrupted, profile
    from cnnperf.zoo.data import DataError, load_data
    from cnnperf.zoo.models import ModelError, build_model
    from cnnperf.zoo.optim import make_optimizer

    # Ctrl-C while loading the data or building the model leaves nothing to write: _cli.run exits 130; from
    # the first measurement on, profile() keeps what it measured (ProfileInterrupted below).
    device, rank, world, joined = _cli.join_torchrun(args.device or _cli.default_device())
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S["cuda" if device.type == "cuda" else "cpu"]
    console = _terminal.make_console()
    quiet = args.quiet or rank != 0
    model_name, data_name = DEFAULT_MODEL["cuda" if device.type == "cuda" else "cpu"]
    model_name, data_name = args.model or model_name, args.data or data_name
    out = Path(args.out).expanduser()
    try:
        torch.manual_seed(args.seed)
        if rank == 0:
            _check_out(out)
        bundle = load_data(data_name, root=args.data_root, batch_size=args.batch_size, seed=args.seed,
                           num_workers=args.workers, pin_memory=False)
        loader = bundle.train_loader
        if world > 1:
            loader = DataLoader(loader.dataset, batch_size=args.batch_size, drop_last=True,
                                sampler=DistributedSampler(loader.dataset, seed=args.seed),
                                num_workers=args.workers, persistent_workers=args.workers > 0)
        model = build_model(model_name, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                            image_size=bundle.image_size).to(device)
        make_optimizer(args.optimizer, [torch.zeros(1, requires_grad=True)], lr=args.lr)  # checks --lr now
        if rank == 0:  # only now: a run that fails before measuring leaves no empty folder behind
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from exc
    except (DataError, ModelError, ValueError, OSError) as exc:
        print(f"cnnperf profile: error: {exc}", file=sys.stderr)
        return 2
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not quiet:
        parameters = sum(p.numel() for p in model.parameters())
        console.print(f"cnnperf profile: {model_name} ({parameters:,} parameters) on {data_name}, batch "
                      f"{args.batch_size}{f' x {world} processes' if world > 1 else ''}, {args.optimizer}, "
                      f"{device}; budget {budget:g} s", highlight=False)

    def log(line: str) -> None:
        if not quiet:
            console.print(line, style="dim", highlight=False)

    info = {"model": model_name, "data": data_name}
    interrupted = False
    try:
        result = profile(model, torch.nn.functional.cross_entropy, loader,
                         functools.partial(make_optimizer, args.optimizer, lr=args.lr), variants=args.variants,
                         steps=args.steps, warmup=args.warmup, budget=budget, batch_sizes=args.batch_sizes,
                         device=device, seed=args.seed, trace=out / "trace.json" if args.trace else None,
                         log=log, run_info=info)
    except ProfileInterrupted as exc:
        result, interrupted = exc.result, True
        if not quiet:
            console.print("Interrupted: writing the report of what was measured.", highlight=False)
    except ProfileError as exc:
        print(f"cnnperf profile: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if rank == 0:
        record = result.record
        paths = result.save(out, console=None if quiet else console)
        if quiet:
            print(f"cnnperf profile: {report.summary_line(record)} ({paths['json']})")
        elif record.get("recommendation"):
            variant = record["recommendation"]["variant"]
            if variant == "eager":
                console.print("Nothing to apply: keep the training step as it is.", highlight=False)
            else:
                console.print(f"To apply it in your script: cnnperf.optimize(model, optimizer, {variant!r}"
                              + (", loader=loader" if "workers" in variant else "") + ")", highlight=False)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
