"""The one harness every cnnperf benchmark runs on: options, the run loop, rows, the record, the exit status.

A benchmark (``conv.py``, ``clip.py``) declares its cases, its variants and how one case is measured; this
module does the rest the same way for all of them:

- the options every benchmark takes (:func:`add_common_arguments`: ``--variants``, ``--device``, ``--quick``,
  ``--backend``, ``--out``) and their machine-dependent defaults (:func:`resolve_common`);
- :func:`run`: the JSON record (:func:`cnnperf._env.record_header`, the benchmark's schema and configuration),
  one case after the other, rewritten atomically after each so that a run cut short keeps what it measured,
  stopping at an optional time budget;
- rows: :func:`timing_fields` (median and 20/80 % quantiles, ms), :func:`error_fields` (a variant that raised
  costs its row, never the run), :func:`add_speedups` (baseline time / variant time within a group);
- :func:`main`: the exit protocol of :func:`cnnperf._cli.run`, the report, and exit status 1 when any row failed.

Imports the tools' shared modules and the ops' public functions; no benchmark imports another.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from cnnperf import _cli, _terminal, backend
from cnnperf._env import device_slug, record_header, utc_now
from cnnperf._format import sig
from cnnperf._io import write_json_atomic
from cnnperf._timing import Timing

DEFAULT_OUT_DIR = Path(".benchmarks") / "cnnperf"  # git-ignored; real GPU records go to bench/results/


@dataclass
class Common:
    """What every benchmark's configuration holds (resolved from the command line)."""

    variants: list[str]
    device: torch.device
    quick: bool
    backend: str
    seed: int = 0
    skipped: dict = field(default_factory=dict)  # variant or case -> why it is not run
    out: Path | None = None  # --out: the record's path or folder (None: an auto-named file, see out_path)


def add_common_arguments(p: argparse.ArgumentParser, variants: Sequence[str], variants_help: str,
                         quick_help: str, out_prefix: str) -> None:
    p.add_argument("--variants", type=_cli.choice_list(variants), default=None, help=variants_help)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{quick_help} (default: on without a GPU)")
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="cnnperf backend (default: CNNPERF_BACKEND, else auto)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON record path, or an existing directory for an auto-named file (default: "
                        f"{DEFAULT_OUT_DIR}/{out_prefix}_<device>_<time>.json)")


def resolve_common(args: argparse.Namespace) -> tuple[torch.device, bool, str]:
    """(device, quick, backend) from the common options; UsageError for what cannot run here."""
    device = _cli.check_device(torch.device(args.device)) if args.device else _cli.default_device()
    quick = (device.type != "cuda") if args.quick is None else args.quick
    try:
        requested = args.backend or backend.requested()
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    return device, quick, requested


def cnnperf_backend_fn(fn: Callable, backend_name: str | None) -> Callable:
    """``fn`` run under ``backend.override(backend_name)`` (as it is when ``backend_name`` is None)."""
    if backend_name is None:
        return fn

    def under_backend(*args, **kwargs):
        with backend.override(backend_name):
            return fn(*args, **kwargs)
    return under_backend


# ---------------------------------------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------------------------------------

TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms")


def timing_fields(t: Timing) -> dict:
    """A timing as row fields, in significant digits (``min_ms`` where the timer has one)."""
    row = {"median_ms": sig(t.median_ms), "p20_ms": sig(t.p20_ms), "p80_ms": sig(t.p80_ms), "reps": t.reps}
    if t.min_ms is not None:
        row["min_ms"] = sig(t.min_ms)
    return row


def error_fields(e: BaseException, measures: Sequence[str] = ()) -> dict:
    """The fields of a row whose variant raised: no timing (nor ``measures``), and the error's first line."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {**dict.fromkeys((*TIMING_KEYS, *measures)), "error": f"{type(e).__name__}: {message}"[:500]}


def add_speedups(rows: Sequence[dict], baseline: str) -> None:
    """``speedup_vs_<baseline> = t_baseline / t_variant`` on the other rows of one group (>1: faster)."""
    ref = next((r.get("median_ms") for r in rows if r["variant"] == baseline), None)
    for r in rows:
        if r["variant"] != baseline:
            r[f"speedup_vs_{baseline}"] = sig(ref / r["median_ms"]) if ref and r.get("median_ms") else None


def failed_rows(record: dict, also: Callable[[dict], bool] = lambda row: False) -> list[dict]:
    """Rows with an error, a failed numerical check, or ``also``."""
    return [r for r in record["rows"] if "error" in r or r.get("check", "ok") != "ok" or also(r)]


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------

def out_path(out: Path | None, prefix: str, device: str, now) -> Path:
    """``out``, or an auto-named file (``<prefix>_<device>_<time>.json``) in DEFAULT_OUT_DIR or in ``out``."""
    name = f"{prefix}_{device_slug(device)}_{now:%Y%m%d-%H%M%S}.json"
    if out is None:
        return DEFAULT_OUT_DIR / name
    out = Path(out)
    return out / name if out.is_dir() else out


def run(*, tool: str, schema: str, prefix: str, device: torch.device, out: Path | None, argv: Sequence[str],
        config: dict, header: dict, cases: Iterable, measure: Callable[[object], list[dict]],
        summarize: Callable[[list[dict]], dict], time_budget_s: float | None = None,
        describe: Callable[[object], str] = str, log: Callable[[str], None] | None = None,
        case_noun: str = "cases") -> tuple[dict, Path]:
    """Measure every case, rewriting the JSON record after each one; returns the record and its path.

    The record: ``schema``, :func:`cnnperf._env.record_header`, ``header`` (what the benchmark measured once,
    e.g. the device's peak), ``config``, then ``rows`` and their ``summarize``; ``complete`` is true when every
    case ran, ``stopped_early`` says why not (the time budget), ``elapsed_s`` the run's wall time.
    """
    now = utc_now()
    start = time.perf_counter()
    record = {"schema": schema, **record_header(tool, device, argv), **header, "config": config,
              "complete": False, "stopped_early": None, "rows": [], "summary": {}}
    path = out_path(out, prefix, record["device"], now)
    write_json_atomic(path, record)  # the header alone already says what was attempted, should the run die
    cases = list(cases)
    for i, case in enumerate(cases, 1):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            record["stopped_early"] = f"time budget of {time_budget_s:g} s reached after {i - 1} {case_noun}"
            break
        if log:
            log(f"[{i}/{len(cases)}] {describe(case)}")
        record["rows"] += measure(case)
        record["summary"] = summarize(record["rows"])
        write_json_atomic(path, record)
    record["complete"] = record["stopped_early"] is None
    record["elapsed_s"] = sig(time.perf_counter() - start)
    write_json_atomic(path, record)
    return record, path


def main(prog: str, argv: Sequence[str] | None, parse: Callable[[list[str]], object],
         measure: Callable[[object, list[str], Callable[[str], None]], tuple[dict, Path]],
         report: Callable[[dict, object], None], failed: Callable[[dict], list[dict]] = failed_rows,
         what_fails: str = "errors or numerical checks") -> int:
    """A benchmark's command: 0 when every row ran and passed its checks, 1 when a row failed, 2 for a bad
    command line (:func:`cnnperf._cli.run`)."""
    def body(parsed) -> int:
        out, err = _terminal.make_console(), _terminal.make_console(stderr=True)
        record, path = measure(parsed, list(sys.argv[1:] if argv is None else argv),
                               lambda msg: err.print(msg, style="dim", highlight=False))
        report(record, out)
        out.print(f"wrote {path} ({len(record['rows'])} rows, {record['elapsed_s']:.1f} s)")
        bad = failed(record)
        if bad:
            print(f"{prog}: {len(bad)} rows failed ({what_fails}); see {path}", file=sys.stderr)
            return 1
        return 0

    return _cli.run(prog, argv, parse, body)


# ---------------------------------------------------------------------------------------------------------
# Terminal cells shared by the tables.
# ---------------------------------------------------------------------------------------------------------

def speedup_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"[{'green' if ratio >= 1 else 'red'}]{ratio:.2f}x[/]"


def check_cell(check: str | None) -> str:
    from rich.markup import escape

    return "-" if check is None else ("[green]ok[/]" if check == "ok" else f"[red]{escape(check[:40])}[/]")
