"""``cnnperf doctor``: train a CNN with the doctor watching, then say what is wrong and what to change.

With no arguments: the MNIST tutorial ConvNet on scikit-learn's digits (resized to 28x28, 20 % held out for
validation), Adam at lr 1e-3 (5 % warm-up, then cosine), batch 64, 10 epochs, on the CPU: about 20 s on 2
cores, start to finish. The record goes to ``./doctor-out/doctor.json`` and ``./doctor-out/report.html``, a
summary to the terminal (progress bars while it trains, on a terminal). Under ``torchrun`` (WORLD_SIZE > 1)
every rank joins the process group (gloo on the CPU, NCCL on GPUs), trains its shard of the training set in
DistributedDataParallel with its own Doctor (their records are combined), and rank 0 prints and writes; the LR
range test runs on rank 0.

Exit status: 0 after a run (whatever it found), 2 for a bad argument or a data set/model that cannot be set up
(one line on stderr), 130 after Ctrl-C (the report of the epochs that finished is still written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import sys
import time
from pathlib import Path

from cnnperf import _cli, _terminal
from cnnperf._cli import UsageError

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_OPTIMIZER = "adam"
DEFAULT_OUT = "doctor-out"


def build_parser() -> argparse.ArgumentParser:
    from cnnperf.zoo.data import DATASETS
    from cnnperf.zoo.models import MODELS
    from cnnperf.zoo.optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, OPTIMIZERS, SCHEDULES

    p = _cli.Parser(prog="cnnperf doctor",
                    description="Train a CNN while watching its gradients, activations, data and curves; then "
                                "report what is wrong, with the evidence, and what to change.")
    p.add_argument("--model", default="convnet", choices=MODELS, help="the model (default: %(default)s)")
    p.add_argument("--data", default="digits", choices=DATASETS,
                   help="the data set (default: %(default)s, scikit-learn's 8x8 digits resized to 28x28)")
    p.add_argument("--data-root", metavar="DIR", help="where MNIST/CIFAR-10 are, or the image folder")
    p.add_argument("--download", action="store_true", help="download MNIST/CIFAR-10 into --data-root")
    p.add_argument("--epochs", type=_cli.positive_int, default=DEFAULT_EPOCHS,
                   help="epochs to train (default: %(default)s)")
    p.add_argument("--batch-size", type=_cli.positive_int, default=DEFAULT_BATCH_SIZE,
                   help="batch size (default: %(default)s)")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=OPTIMIZERS,
                   help="optimizer (default: %(default)s; SGD has Nesterov momentum 0.9)")
    p.add_argument("--lr", type=_cli.positive_float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=_cli.nonnegative_float, default=None,
                   help="weight decay (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHT_DECAY.items())
                        + ")")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="lr schedule: cosine (5%% linear warm-up, then cosine to 0; the default) or constant")
    p.add_argument("--clip", type=_cli.positive_float, default=None, metavar="MAX_NORM",
                   help="clip the total gradient norm to this (cnnperf.clip_grad_norm_; default: no clipping)")
    p.add_argument("--augment", action="store_true", help="augment the training images")
    p.add_argument("--find-lr", action="store_true",
                   help="run the LR range test first (on copies of the model and optimizer) and report its suggestion")
    p.add_argument("--monitor", choices=("val_acc", "val_loss"), default="val_acc",
                   help="the metric that picks the best epoch and the early-stopping point (default: val_acc; "
                        "the validation loss rises from overconfidence while the accuracy still improves)")
    p.add_argument("--device", type=_cli.device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--workers", type=_cli.nonnegative_int, default=0,
                   help="DataLoader worker processes (default: %(default)s)")
    p.add_argument("--sample-every", type=_cli.positive_int, default=10,
                   help="per-layer statistics every N steps (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where doctor.json and report.html go (default: ./%(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary, only the verdict line")
    p.add_argument("--limit-batches", type=_cli.positive_int, default=None,
                   help=argparse.SUPPRESS)  # tests: batches per epoch
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, checked: UsageError naming the option for anything that cannot run."""
    args = build_parser().parse_args(argv)
    _cli.check_device(args.device)
    # The one check that needs two options: a data root to download into need not exist yet.
    if args.data_root is not None and not args.download and not Path(args.data_root).expanduser().is_dir():
        raise UsageError(f"--data-root {args.data_root} is not a directory"
                         + ("" if args.data in ("digits", "fake", "imagefolder") else
                            f" (add --download to fetch {args.data} into it)"))
    return args


def main(argv: list[str] | None = None) -> int:
    return _cli.run("cnnperf doctor", argv, parse, lambda args: _run(args, args.device))


def _run(args, device) -> int:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from torch.utils.data import DataLoader, DistributedSampler

    from cnnperf._env import cpu_count
    from cnnperf.doctor import report as reports
    from cnnperf.doctor.monitor import Doctor
    from cnnperf.doctor.train import FitState, classification_metrics, describe_row, fit, lr_range_test
    from cnnperf.zoo.data import DataError, load_data
    from cnnperf.zoo.models import ModelError, build_model
    from cnnperf.zoo.optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, make_optimizer, make_scheduler

    started = _dt.datetime.now(_dt.timezone.utc)
    clock = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Under torchrun every rank trains its shard of the data in DistributedDataParallel and runs a Doctor;
    # their records are combined, and rank 0 prints and writes.
    device, rank, world, joined = _cli.join_torchrun(device)
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer] if args.weight_decay is None else args.weight_decay
    out = Path(args.out).expanduser()
    try:  # everything that depends on the arguments, before any training
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise ValueError(f"--out {out} is not writable")
        bundle = load_data(args.data, root=args.data_root, batch_size=args.batch_size, augment=args.augment,
                           seed=args.seed, download=args.download, num_workers=args.workers,
                           pin_memory=device.type == "cuda")
        train_loader = bundle.train_loader
        if world > 1:  # the same number of steps on every rank (drop_last), as DDP needs
            train_loader = DataLoader(train_loader.dataset, batch_size=args.batch_size, drop_last=True,
                                      sampler=DistributedSampler(train_loader.dataset, seed=args.seed),
                                      num_workers=args.workers, persistent_workers=args.workers > 0,
                                      pin_memory=device.type == "cuda")
        model = build_model(args.model, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                            image_size=bundle.image_size).to(device)
        optimizer = make_optimizer(args.optimizer, model.parameters(), lr=lr, weight_decay=weight_decay)
    except (DataError, ModelError, ValueError, OSError) as exc:
        print(f"cnnperf doctor: error: {exc}", file=sys.stderr)
        if joined:
            torch.distributed.destroy_process_group()
        return 2
    plain = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    console = _terminal.make_console()
    quiet = args.quiet or rank != 0
    show_progress = not quiet and console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not show_progress)
    parameters = sum(p.numel() for p in model.parameters())
    if not quiet:
        console.print(f"cnnperf doctor: {args.model} ({parameters:,} parameters) on {args.data} "
                      f"({bundle.train_size:,} training / {bundle.val_size:,} validation images), {args.epochs} "
                      f"epochs, {args.optimizer} lr {lr:g} ({args.schedule}), batch {args.batch_size}"
                      f"{f' x {world} processes' if world > 1 else ''}, {device}", highlight=False)

    def on_epoch(row: dict) -> None:  # printed above the progress bars, or alone in a log
        if not quiet:
            console.print(describe_row(row, args.epochs), highlight=False)

    state = FitState()
    finder = None
    doctor = None
    interrupted = False
    try:
        with progress:
            if args.find_lr:  # on copies of the model and the optimizer, before training (rank 0's, for all)
                if rank == 0:
                    finder = lr_range_test(plain, optimizer, bundle.train_loader, device=device, progress=progress)
                if world > 1:
                    box = [finder]
                    torch.distributed.broadcast_object_list(box, src=0)
                    finder = box[0]
                if not quiet:
                    suggestion = ("none (the loss never fell)" if finder["suggested_lr"] is None else
                                  f"{finder['suggested_lr']:.3g} ({finder['method']})")
                    console.print(f"LR range test: suggested lr {suggestion}; this run trains at {lr:g}",
                                  highlight=False)
            batches = len(train_loader)
            if args.limit_batches is not None:
                batches = min(batches, args.limit_batches)
            scheduler = make_scheduler(optimizer, args.schedule, args.epochs * batches)
            doctor = Doctor(model, sample_every=args.sample_every)
            fit(model, train_loader, bundle.val_loader, optimizer, doctor, epochs=args.epochs, device=device,
                clip=args.clip, limit_batches=args.limit_batches, scheduler=scheduler,
                progress=progress if show_progress else None, on_epoch=on_epoch, state=state)
    except KeyboardInterrupt:
        interrupted = True
        if not quiet:
            console.print(f"Interrupted after {state.epochs_done} epoch(s): writing the report of what was done.",
                          highlight=False)
    finally:
        if doctor is not None:
            doctor.close()
    if doctor is None:  # interrupted during the LR range test: an empty record
        doctor = Doctor(model, sample_every=args.sample_every)
        doctor.close()
    if state.stop_reason is not None and not quiet:
        console.print(f"Stopped early: {state.stop_reason}.", highlight=False)

    metrics = None
    if state.last_eval is not None:
        metrics = classification_metrics(state.last_eval.targets, state.last_eval.predictions, bundle.class_names)
    run = {"model": args.model, "data": args.data, "device": str(device), "epochs": args.epochs,
           "epochs_done": state.epochs_done, "batch_size": args.batch_size, "lr": lr, "optimizer": args.optimizer,
           "schedule": args.schedule, "clip": args.clip, "augment": bool(args.augment), "seed": args.seed,
           "started": started.isoformat(timespec="seconds"),
           "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "interrupted": interrupted, "seconds": time.perf_counter() - clock, "parameters": parameters,
           "train_size": bundle.train_size, "val_size": bundle.val_size, "weight_decay": weight_decay,
           "num_classes": bundle.num_classes, "num_workers": args.workers, "cpu_count": cpu_count(),
           "stop_reason": state.stop_reason, "limit_batches": args.limit_batches, "interface": "cli",
           "monitor": args.monitor}
    findings, record = doctor.report(run, metrics=metrics, lr_finder=finder)
    if joined:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 130 if interrupted else 0
    paths = reports.write_reports(record, out, console=None if quiet else console)
    if args.quiet:
        level, sentence = reports.verdict(record)
        print(f"cnnperf doctor: {sentence} ({paths['json']})")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
