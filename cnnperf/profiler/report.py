"""The profiler's reports, made from a profile.json record (a plain dict, see SCHEMA.md) and nothing else:
:func:`render_terminal` (a rich summary), :func:`html_report` / :func:`render_html` (one self-contained HTML page:
inline CSS, PNG plots embedded as base64, no script), :func:`write_reports` (profile.json and report.html into a
folder, and the terminal summary) and :func:`summary_line` (the outcome in one sentence). Every part of the record
may be missing or null (a run stopped by Ctrl-C): the terminal says so in one line, the HTML replaces a plot by a
note. Imports no torch: only :mod:`cnnperf._format`, :mod:`cnnperf._io`, :mod:`cnnperf._terminal` and
:mod:`cnnperf.reporting` (rich and matplotlib's Agg canvas when drawing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from cnnperf._format import (
    duration as _duration,
    finite as _finite,
    fmt as _fmt,
    int_or_none as _int,
    num as _num,
    pct as _pct,
    plural as _plural,
    text as _text,
)
from cnnperf._io import jsonable, write_json_atomic, write_text_atomic
from cnnperf._terminal import one_line as _one_line, print_table as _print_table
from cnnperf.reporting import (
    CSS as _CSS,
    Skip as _Skip,
    escape as _e,
    figure as _figure,
    html_plot as _html_plot,
    html_table as _html_table,
    section as _section,
)

__all__ = ["SCHEMA", "html_report", "jsonable", "render_html", "render_terminal", "summary_line",
           "write_json_atomic", "write_reports"]

SCHEMA = "cnnperf.profile/1"
PHASES = ("data", "forward", "backward", "optimizer")
WIDE = 120  # console columns from which the terminal shows every column of the variants table
TOP_OPS_TERMINAL = 10
TOP_OPS_PLOT = 15

_STATUS_STYLE = {"ok": "green", "failed": "bold red", "skipped": "yellow", "not_applicable": "dim"}
_STATUS_SHORT = {"not_applicable": "n/a"}
# Columns of the HTML variants table that go when no variant has a value (peak memory and MFU on the CPU).
_EMPTY_WHEN_DASHES = ("peak MiB", "compile s", "setup s", "MFU %", "data/fwd/bwd/opt ms", "images/s")
_PHASE_COLOUR = {"data": "#ffb74d", "forward": "#64b5f6", "backward": "#1565c0", "optimizer": "#9575cd"}
_BAR_COLOUR = {"baseline": "#78909c", "recommended": "#2e7d32", "other": "#90caf9"}

_PROFILE_CSS = """
.rec{padding:.6em 1em;border-radius:4px;margin:1em 0}.rec p{margin:.3em 0}.rec ul{margin:.3em 0}
.rec.better{background:#e8f5e9;color:#1b5e20}.rec.keep{background:#e3f2fd;color:#0d47a1}
.rec.none{background:#f5f5f5;color:#616161}.databound{background:#fff3e0;color:#bf360c;padding:.4em .8em;
border-radius:4px}td.st-failed{color:#b71c1c}td.st-skipped{color:#e65100}td.st-not_applicable{color:#757575}
td.fail,td.st-oom{color:#b71c1c;font-weight:bold}
"""


# ---------------------------------------------------------------------------------------------------------
# Reading the record: lenient about what is missing, never about what it is given.
# ---------------------------------------------------------------------------------------------------------

def _check_record(record: Any) -> Mapping:
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a {SCHEMA} dict (profile.json), got {type(record).__name__}")
    schema = record.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"record has schema {schema!r}; these renderers read {SCHEMA!r}")
    return record


def _list(x: Any) -> list:
    """``x`` as a list where it is a list or tuple, else empty (None, or anything the schema does not allow)."""
    return list(x) if isinstance(x, (list, tuple)) else []


def _variants(record: Mapping) -> list[Mapping]:
    return [v for v in _list(record.get("variants")) if isinstance(v, Mapping)]


def _baseline_name(record: Mapping) -> str:
    return _text(record.get("baseline"), "eager")


def _recommended(record: Mapping) -> str | None:
    name = _section(record, "recommendation").get("variant")
    return None if name is None else str(name)


def _find(record: Mapping, name: Any) -> Mapping:
    return next((v for v in _variants(record) if v.get("name") == name), {})


def _speedup(record: Mapping, variant: Mapping) -> float | None:
    """The variant's speed-up over the baseline: the record's, else baseline median / its median."""
    speedup = _finite(variant.get("speedup"))
    if speedup is None and variant.get("status") == "ok":
        base, mine = _finite(_find(record, _baseline_name(record)).get("median_ms")), _finite(variant.get("median_ms"))
        if base is not None and mine:
            speedup = base / mine
    return speedup


def _ms(x: Any) -> str:
    value = _finite(x)
    if value is None:
        return _fmt(x)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _rate(x: Any) -> str:
    value = _finite(x)
    return _fmt(x) if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _times(x: Any) -> str:
    value = _finite(x)
    return _fmt(x) if value is None else f"{value:.2f}x"


def _mib(x: Any) -> str:
    value = _finite(x)
    return "-" if value is None else f"{value / 2 ** 20:,.0f}"


def _si(x: Any, unit: str) -> str:
    """3.64e12, "FLOP" -> "3.64 TFLOP"."""
    value = _finite(x)
    if value is None:
        return "?"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _range(v: Mapping) -> str:
    low, high = _finite(v.get("p20_ms")), _finite(v.get("p80_ms"))
    return "" if low is None or high is None else f"{_ms(low)}-{_ms(high)}"


def _split(v: Mapping) -> str:
    """The phase medians as "data/forward/backward/optimizer" in ms, "-" without them."""
    phases = v.get("phases_ms")
    if not isinstance(phases, Mapping):
        return "-"
    return "/".join(_ms(phases.get(p)) for p in PHASES)


def _check(v: Mapping, baseline: str) -> tuple[str, bool | None]:
    """(cell text, passed): "ok 0.12" (gradient error / tolerance), "FAIL grad 0.31>0.1", "ref" or "-"."""
    check = v.get("check")
    if not isinstance(check, Mapping):
        return ("ref" if v.get("name") == baseline and v.get("status") == "ok" else "-"), None
    grad, grad_tol = _finite(check.get("grad_err")), _finite(check.get("grad_tol"))
    loss, loss_tol = _finite(check.get("loss_err")), _finite(check.get("loss_tol"))
    if check.get("passed"):
        return ("ok" if grad is None or not grad_tol else f"ok {grad / grad_tol:.2f}"), True
    for what, err, tol in (("grad", grad, grad_tol), ("loss", loss, loss_tol)):
        if err is not None and tol is not None and err > tol:
            return f"FAIL {what} {err:.2g}>{tol:.2g}", False
    return "FAIL", False


def _check_detail(check: Any) -> str:
    if not isinstance(check, Mapping):
        return ""
    worst = check.get("worst_param")
    return (f"{_text(check.get('precision'))} over {_text(check.get('steps'))} steps: loss error "
            f"{_fmt(check.get('loss_err'), '.2g')} (tolerance {_fmt(check.get('loss_tol'), '.2g')}), gradient "
            f"error {_fmt(check.get('grad_err'), '.2g')} (tolerance {_fmt(check.get('grad_tol'), '.2g')})"
            + (f", worst parameter {worst}" if worst else ""))


def _note(v: Mapping) -> str:
    """What the last column says: the error, the reason, or the spread between ranks."""
    status = v.get("status")
    if status == "failed":
        return _text(v.get("error"), "failed (no error recorded)")
    if status in ("skipped", "not_applicable"):
        return _text(v.get("reason"), "")
    ranks = v.get("ranks")
    if isinstance(ranks, Mapping) and _finite(ranks.get("spread")) is not None:
        return f"{len(_list(ranks.get('median_ms')))} ranks, spread {_pct(ranks.get('spread'))}"
    return ""


def _mfu(x: Any) -> str:
    value = _finite(x)
    return "-" if value is None else f"{100 * value:.1f}"


def _header_parts(record: Mapping) -> tuple[str, str, bool]:
    """(line, second line, interrupted)."""
    run = _section(record, "run")
    params = _int(run.get("parameters"))
    parts = [f"{_text(run.get('model'))} on {_text(run.get('device_name') or run.get('device'))}"
             + (f" ({run.get('device')})" if run.get("device_name") and run.get("device") else ""),
             f"batch {_text(run.get('batch_size'))}"]
    if params is not None:
        parts.append(f"{params:,} parameters")
    flops = _finite(_section(record, "flops").get("per_step"))
    if flops is not None:
        parts.append(f"{_si(flops, 'FLOP')} per step")
    world = _int(run.get("world_size"))
    if world is not None and world > 1:
        parts.append(f"{world} ranks")
    steps, warmup = _int(run.get("steps")), _int(run.get("warmup"))
    facts = [f"data: {_text(run.get('data'))}"]
    if steps is not None:
        facts.append(f"{_plural(steps, 'timed step')}" + (f" after {warmup} warm-up" if warmup is not None else "")
                     + " per variant")
    facts.append(f"{_duration(run.get('elapsed_s'))} in all")
    return ", ".join(parts), "; ".join(facts), bool(run.get("interrupted"))


def _not_measured(record: Mapping) -> str:
    run = _section(record, "run")
    requested = _list(run.get("variants_requested"))
    done = [v for v in _variants(record) if v.get("status") is not None]
    where = f" after {len(done)} of {len(requested)} variants" if requested else ""
    return f"the run was interrupted{where}" if run.get("interrupted") else "the record has no recommendation"


def summary_line(record: Mapping) -> str:
    """The outcome in one sentence, e.g. "recommended bf16+channels_last: 1.42x faster than eager (41.8 -> 29.4
    ms/step)" or "keep eager: no variant was worth switching to (the fastest, channels_last, was 1.01x)"."""
    record = _check_record(record)
    baseline = _baseline_name(record)
    rec = _section(record, "recommendation")
    name = _recommended(record)
    if name is None:
        return f"no recommendation: {_not_measured(record)}"
    data = ""
    if rec.get("data_bound"):
        fraction = _finite(rec.get("data_fraction"))
        data = "; the data loader dominates" + (f" ({_pct(fraction)} of the step)" if fraction is not None else "")
    confirmation = _section(rec, "confirmation")
    confirmed = _finite(confirmation.get("speedup"))
    if name != baseline:
        chosen, base = _find(record, name), _find(record, baseline)
        speedup = _finite(rec.get("speedup"))
        speedup = _speedup(record, chosen) if speedup is None else speedup
        line = f"recommended {name}: " + (f"{speedup:.2f}x faster than {baseline}" if speedup is not None
                                          else f"faster than {baseline}")
        spread = _list(rec.get("speedup_spread"))
        facts = []
        if confirmed is not None:  # the headline is the confirmation's: say its spread and the search's figure
            if len(spread) == 2 and all(_finite(x) is not None for x in spread):
                facts.append(f"p20-p80 {spread[0]:.2f}-{spread[1]:.2f} over {_int(confirmation.get('rounds'))} "
                             "rounds in turns")
            before, after = _finite(confirmation.get("baseline_ms")), _finite(confirmation.get("variant_ms"))
            search = _speedup(record, chosen)
            if search is not None:
                facts.append(f"the search measured {search:.2f}x")
        else:
            before, after = _finite(base.get("median_ms")), _finite(chosen.get("median_ms"))
        if before is not None and after is not None:
            facts.insert(0, f"{_ms(before)} -> {_ms(after)} ms/step")
        return line + (f" ({'; '.join(facts)})" if facts else "") + data
    if confirmed is not None:  # the search's fastest variant did not keep its gain when timed again
        p20, p80 = _finite(confirmation.get("speedup_p20")), _finite(confirmation.get("speedup_p80"))
        if p20 is not None and p80 is not None:
            return (f"keep {baseline}: the fastest variant was not reliably faster when timed again in turns "
                    f"({confirmed:.2f}x, p20-p80 {p20:.2f}-{p80:.2f})" + data)
        return (f"keep {baseline}: the fastest variant's gain did not hold when timed again in turns "
                f"({confirmed:.2f}x)" + data)
    candidates = [(s, v) for v in _variants(record) if v.get("name") != baseline and v.get("status") == "ok"
                  and _check(v, baseline)[1] is not False for s in [_speedup(record, v)] if s is not None]
    if not candidates:
        return f"keep {baseline}: no other variant ran and passed its check" + data
    speedup, fastest = max(candidates, key=lambda sv: sv[0])
    verdict = "no variant was worth switching to" if speedup > 1 else "nothing measured beat it"
    return f"keep {baseline}: {verdict} (the fastest, {_text(fastest.get('name'))}, was {speedup:.2f}x)" + data


def _confirmation_sentence(record: Mapping) -> str | None:
    confirmation = _section(record, "recommendation", "confirmation")
    speedup = _finite(confirmation.get("speedup"))
    if speedup is None:
        return None
    rounds, steps = _int(confirmation.get("rounds")), _int(confirmation.get("steps"))
    how = "" if rounds is None or steps is None else f", {_plural(rounds, 'round')} of {_plural(steps, 'step')}"
    p20, p80 = _finite(confirmation.get("speedup_p20")), _finite(confirmation.get("speedup_p80"))
    spread = f" (p20-p80 of the rounds: {p20:.2f}-{p80:.2f})" if p20 is not None and p80 is not None else ""
    others = [f"{_text(c.get('variant'))} {c['speedup']:.2f}x" for c in _list(confirmation.get("contenders"))
              if isinstance(c, Mapping) and c.get("variant") != confirmation.get("variant")
              and _finite(c.get("speedup")) is not None]
    also = f" The other contenders in the same rounds: {', '.join(others)}." if others else ""
    return (f"Timed again in turns with {_baseline_name(record)}: {_ms(confirmation.get('baseline_ms'))} -> "
            f"{_ms(confirmation.get('variant_ms'))} ms/step, {speedup:.2f}x{spread}{how}.{also}")


def _data_bound_sentence(rec: Mapping) -> str | None:
    if not rec.get("data_bound"):
        return None
    fraction = _finite(rec.get("data_fraction"))
    share = f"{_pct(fraction)} of the baseline step is" if fraction is not None else "most of the baseline step is"
    return (f"The data loader dominates: {share} spent waiting for data, so model-side variants can only speed up "
            "the rest; feed the model faster first (more DataLoader workers, pin_memory, lighter preprocessing).")


# ---------------------------------------------------------------------------------------------------------
# Terminal.
# ---------------------------------------------------------------------------------------------------------

def _terminal_variants(record: Mapping, console) -> None:
    from rich.text import Text

    variants = _variants(record)
    if not variants:
        console.print("[dim]No variant measured.[/dim]")
        return
    wide = console.width >= WIDE
    baseline, chosen = _baseline_name(record), _recommended(record)
    heads = [("variant", "left"), ("status", "left"), ("ms", "right"), ("img/s", "right"), ("speed-up", "right"),
             ("data/fwd/bwd/opt ms", "right"), ("peak MiB", "right"), ("compile s", "right"), ("check", "left"),
             ("MFU %", "right")]
    optional = ["img/s", "MFU %", "peak MiB", "compile s", "data/fwd/bwd/opt ms"]  # the first to go
    rows, notes = [], []
    for v in variants:
        name, status = _text(v.get("name")), _text(v.get("status"))
        best = chosen is not None and name == chosen
        check, passed = _check(v, baseline)
        median = Text(_ms(v.get("median_ms")))
        if wide and _range(v):
            median.append(f" {_range(v)}", style="dim")
        cells = [Text(name + (" ◀" if best else "")),
                 Text(_STATUS_SHORT.get(status, status), style=_STATUS_STYLE.get(status, "")),
                 median, Text(_rate(v.get("images_per_s"))), Text(_times(_speedup(record, v))), Text(_split(v)),
                 Text(_mib(v.get("peak_memory"))), Text(_fmt(v.get("compile_s"), ".1f")),
                 Text(check, style="bold red" if passed is False else ""), Text(_mfu(v.get("mfu")))]
        rows.append((cells, "bold green" if best else None))
        notes.append((name, _note(v), "red" if status == "failed" else "dim"))
    absent = [h for h, key in (("MFU %", "mfu"), ("compile s", "compile_s"))
              if all(_finite(v.get(key)) is None for v in variants)]
    if not wide:
        absent = optional
    keep = [i for i, (h, _) in enumerate(heads) if h not in absent]
    console.print(Text("Variants", style="bold") + Text(" in measured order; ms: median step time"
                                                        + (", p20-p80 dim" if wide else ""), style="dim"))
    _print_table(console, [heads[i] for i in keep], [([c[i] for i in keep], s) for c, s in rows], notes,
                 optional=[h for h in optional if h not in absent], drop_for_notes=2, note_min=40)


def _terminal_recommendation(record: Mapping, console) -> None:
    from rich.text import Text

    rec = record.get("recommendation")
    if not isinstance(rec, Mapping):
        console.print(f"[dim]No recommendation: {_not_measured(record)}.[/dim]")
        return
    name = _text(rec.get("variant"))
    text = Text("Recommendation: ", style="bold")
    text.append(name, style="bold green")
    speedup = _finite(rec.get("speedup"))
    if speedup is not None and name != _baseline_name(record):
        text.append(f" ({speedup:.2f}x)", style="bold green")
    if rec.get("summary"):
        text.append(f". {rec.get('summary')}")
    console.print(text)
    confirmation = _confirmation_sentence(record)
    if confirmation:
        console.print(Text(f"  {confirmation}", style="dim"))
    for item in _list(rec.get("not_chosen")):
        if isinstance(item, Mapping):
            line = Text(f"  not {_text(item.get('variant'))}: ", style="dim")
            line.append(_text(item.get("why"), ""))
            console.print(line)
    sentence = _data_bound_sentence(rec)
    if sentence:
        console.print(Text(sentence, style="bold yellow"))


def _by(top: Mapping) -> str:
    """What the top ops are ranked by, in words."""
    by = _text(top.get("by"), "self time")
    return {"self_device_time": "self device time", "self_cpu_time": "self CPU time"}.get(by, by.replace("_", " "))


def _terminal_top_ops(record: Mapping, console) -> None:
    from rich.text import Text

    top = _section(record, "top_ops")
    ops = [op for op in _list(top.get("ops")) if isinstance(op, Mapping)]
    if not ops:
        return
    by = _by(top)
    console.print(Text("Top ops", style="bold") + Text(f" of {_text(top.get('variant'))} by {_text(by)}, per step",
                                                       style="dim"))
    rows = [([Text(_one_line(op.get("name"), max(20, console.width - 36))), Text(_ms(op.get("self_ms"))),
              Text(_fmt(op.get("calls"), ".0f")), Text(_fmt(op.get("percent"), ".1f"))], None)
            for op in ops[:TOP_OPS_TERMINAL]]
    _print_table(console, [("op", "left"), ("self ms", "right"), ("calls", "right"), ("% of step", "right")], rows)


def _sweep_rows(record: Mapping) -> list[Mapping]:
    return [r for r in _list(_section(record, "batch_sweep").get("rows")) if isinstance(r, Mapping)]


def _sweep_marks(sweep: Mapping, row: Mapping) -> str:
    size = _int(row.get("batch_size"))
    close = [_text(b) for b in _list(sweep.get("best_within_noise_of"))]
    best = "best" + (f" (within the noise of batch {', '.join(close)})" if close else "")
    marks = [m for m, at in ((best, _int(sweep.get("best_batch_size"))),
                             ("largest fitting", _int(sweep.get("largest_fitting")))) if at is not None and size == at]
    return ", ".join(marks)


def _sweep_rate(row: Mapping) -> str:
    """images/s with the spread of the steps: ``1,211 [1,150-1,260]``."""
    spread = _list(row.get("images_per_s_p20_p80"))
    low, high = (_finite(spread[0]), _finite(spread[1])) if len(spread) == 2 else (None, None)
    return _rate(row.get("images_per_s")) + (f" [{_rate(low)}-{_rate(high)}]" if low is not None and high is not None
                                             else "")


_SWEEP_STOPPED = {"oom": "stopped: out of memory", "failed": "stopped: a step failed",
                  "flat": "stopped: two doublings gained under 2 % each", "cap": "stopped at the automatic "
                  "sweep's largest size", "budget": "stopped: the time budget ran out",
                  "end of list": "every size asked for"}


def _no_sweep_reason(record: Mapping) -> str:
    """Why a run has no sweep rows, in a few words."""
    sweep = record.get("batch_sweep")
    if isinstance(sweep, Mapping) and sweep.get("error"):
        return _text(sweep.get("error"))
    if isinstance(sweep, Mapping):
        return "no size was measured"
    if (_int(_section(record, "run").get("world_size")) or 1) > 1:
        return "off under torch.distributed (an out-of-memory on one rank would stall the others)"
    return "not asked for (batch_sizes=None, --batch-sizes none)"


def _terminal_batch_sweep(record: Mapping, console) -> None:
    from rich.text import Text

    sweep, rows = _section(record, "batch_sweep"), _sweep_rows(record)
    if not rows:
        console.print(Text(f"No batch-size sweep: {_no_sweep_reason(record)}.", style="dim"))
        return
    best = _int(sweep.get("best_batch_size"))
    stopped = _SWEEP_STOPPED.get(sweep.get("stopped"))
    console.print(Text("Batch sweep", style="bold") + Text(f" of {_text(sweep.get('variant'))}"
                                                           + (f" ({stopped})" if stopped else ""), style="dim"))
    cells, notes = [], []
    for row in rows:
        status, size = _text(row.get("status")), _int(row.get("batch_size"))
        marks = _sweep_marks(sweep, row)
        cells.append(([Text(_text(size)), Text(status, style=_STATUS_STYLE.get(status, "bold red")),
                       Text(_ms(row.get("median_ms"))), Text(_sweep_rate(row)),
                       Text(_mib(row.get("peak_memory")))],
                      "bold green" if best is not None and size == best else None))
        notes.append((f"batch {_text(size)}", ("◀ " + marks if marks else "") if status == "ok"
                      else _text(row.get("error"), ""), "" if status == "ok" else "red"))
    _print_table(console, [("batch", "right"), ("status", "left"), ("ms", "right"), ("img/s [p20-p80]", "right"),
                           ("peak MiB", "right")], cells, notes)


def render_terminal(record: Mapping, console) -> None:
    """Print the summary of ``record`` (a profile.json dict) to ``console`` (a :class:`rich.console.Console`).

    Below :data:`WIDE` columns the variants table keeps variant, status, median ms, speed-up and check, and the
    errors and reasons follow it one per line."""
    from rich.text import Text

    record = _check_record(record)
    line, facts, interrupted = _header_parts(record)
    console.print(Text.assemble(("cnnperf profile: ", "bold"), line,
                                (", interrupted" if interrupted else "", "bold red")))
    console.print(Text(facts, style="dim"))
    _terminal_variants(record, console)
    _terminal_recommendation(record, console)
    _terminal_top_ops(record, console)
    _terminal_batch_sweep(record, console)
    if record.get("trace"):
        console.print(Text(f"Trace: {record.get('trace')}", style="dim"))


# ---------------------------------------------------------------------------------------------------------
# Plots: each function returns a Figure, or raises _Skip with the note the report shows instead.
# ---------------------------------------------------------------------------------------------------------

def _measured(record: Mapping) -> list[Mapping]:
    return [v for v in _variants(record) if v.get("status") == "ok" and _finite(v.get("median_ms")) is not None]


def _bar_height(n: int, per_bar: float = 0.42) -> float:
    return min(max(per_bar * n + 1.3, 2.4), 14.0)


def _plot_step_times(record: Mapping):
    from matplotlib.patches import Patch

    variants = _measured(record)
    if not variants:
        raise _Skip("no variant has a measured step time")
    baseline, chosen = _baseline_name(record), _recommended(record)
    names = [_text(v.get("name")) for v in variants]
    medians = [_finite(v.get("median_ms")) for v in variants]
    low = [max(0.0, m - (_finite(v.get("p20_ms")) if _finite(v.get("p20_ms")) is not None else m))
           for v, m in zip(variants, medians)]
    high = [max(0.0, (_finite(v.get("p80_ms")) if _finite(v.get("p80_ms")) is not None else m) - m)
            for v, m in zip(variants, medians)]
    colours = [_BAR_COLOUR["recommended"] if n == chosen else _BAR_COLOUR["baseline"] if n == baseline
               else _BAR_COLOUR["other"] for n in names]
    fig = _figure(9.5, _bar_height(len(variants)))
    ax = fig.subplots()
    y = range(len(variants))
    ax.barh(y, medians, xerr=[low, high], color=colours, error_kw={"ecolor": "#424242", "capsize": 3, "lw": 1})
    ax.set_yticks(y, [_one_line(n, 40) for n in names], fontsize=8)
    ax.invert_yaxis()
    for i, (v, m) in enumerate(zip(variants, medians)):
        speedup = _speedup(record, v)
        label = f" {_ms(m)} ms" + (f"  {speedup:.2f}x" if speedup is not None else "")
        ax.annotate(label, (m + high[i], i), va="center", fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.set_xlim(0, max(max(m + h for m, h in zip(medians, high)) * 1.28, 1e-3))
    ax.set_xlabel("median step time (ms), bars p20-p80")
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=_BAR_COLOUR["baseline"], label=f"baseline ({baseline})")]
    if chosen is not None:
        legend.insert(0, Patch(color=_BAR_COLOUR["recommended"], label=f"recommended ({chosen})"))
    ax.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _plot_phases(record: Mapping):
    import numpy as np

    variants = [v for v in _measured(record) if isinstance(v.get("phases_ms"), Mapping)]
    if not variants:
        raise _Skip("no phase split recorded")
    values = np.array([[_num(v["phases_ms"].get(p)) for p in PHASES] for v in variants], dtype=float)
    values = np.where(np.isfinite(values) & (values > 0), values, 0.0)
    fig = _figure(9.5, _bar_height(len(variants)))
    ax = fig.subplots()
    y = np.arange(len(variants))
    left = np.zeros(len(variants))
    for j, phase in enumerate(PHASES):
        ax.barh(y, values[:, j], left=left, color=_PHASE_COLOUR[phase], label=phase)
        left += values[:, j]
    medians = [_finite(v.get("median_ms")) for v in variants]
    ax.scatter(medians, y, marker="|", s=260, color="black", linewidths=1.6, label="median step", zorder=3)
    ax.set_yticks(y, [_one_line(v.get("name"), 40) for v in variants], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(left), max(medians), 1e-3) * 1.05)
    ax.set_xlabel("ms per step (median of each phase)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _plot_batch_sweep(record: Mapping):
    sweep, rows = _section(record, "batch_sweep"), _sweep_rows(record)
    if not rows:
        raise _Skip(f"no batch-size sweep in this run: {_no_sweep_reason(record)}")
    ok = [(_int(r.get("batch_size")), _finite(r.get("images_per_s")), _finite(r.get("peak_memory")))
          for r in rows if r.get("status") == "ok"]
    ok = [(b, ips, mem) for b, ips, mem in ok if b is not None and ips is not None]
    if not ok:
        raise _Skip("no batch size of the sweep was measured")
    sizes = [b for b, _, _ in ok]
    fig = _figure(8.5, 3.6)
    ax = fig.subplots()
    ax.plot(sizes, [ips for _, ips, _ in ok], "o-", color="#1565c0", linewidth=1.5, label="images/s")
    all_sizes = sorted({_int(r.get("batch_size")) for r in rows} - {None})
    for status, colour, label in (("oom", "#c62828", "out of memory"), ("failed", "#616161", "failed")):
        failed = [_int(r.get("batch_size")) for r in rows if r.get("status") == status]
        failed = [b for b in failed if b is not None]
        if failed:
            ax.scatter(failed, [0] * len(failed), marker="x", s=70, color=colour, linewidths=2, label=label,
                       zorder=3, clip_on=False)
            for b in failed:
                ax.annotate(status.upper() if status == "oom" else status, (b, 0), xytext=(0, 7),
                            textcoords="offset points", ha="center", fontsize=8, color=colour)
    best = _int(sweep.get("best_batch_size"))
    if best is not None:
        ax.axvline(best, color="#2e7d32", linestyle="--", linewidth=1, label=f"best batch {best}")
    if all_sizes and all_sizes[0] > 0 and all_sizes[-1] >= 4 * all_sizes[0]:
        ax.set_xscale("log", base=2)
    ax.set_xticks(all_sizes, [str(b) for b in all_sizes], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s", color="#1565c0")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    memory = [(b, mem) for b, _, mem in ok if mem is not None]
    if memory:
        ax2 = ax.twinx()
        ax2.plot([b for b, _ in memory], [mem / 2 ** 30 for _, mem in memory], "s--", color="#8d6e63",
                 linewidth=1.2, markersize=4, label="peak memory")
        ax2.set_ylim(bottom=0)
        ax2.set_ylabel("peak memory (GiB)", color="#8d6e63")
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    fig.legend(handles, labels, fontsize=8, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig


def _plot_top_ops(record: Mapping):
    top = _section(record, "top_ops")
    ops = [op for op in _list(top.get("ops")) if isinstance(op, Mapping) and _finite(op.get("self_ms")) is not None]
    if not ops:
        raise _Skip("no operator profile in this run")
    ops = ops[:TOP_OPS_PLOT]
    fig = _figure(9.5, _bar_height(len(ops), 0.3))
    ax = fig.subplots()
    values = [_finite(op.get("self_ms")) for op in ops]
    y = range(len(ops))
    ax.barh(y, values, color="#7986cb")
    ax.set_yticks(y, [_one_line(op.get("name"), 48) for op in ops], fontsize=7.5)
    ax.invert_yaxis()
    for i, (op, value) in enumerate(zip(ops, values)):
        percent = _finite(op.get("percent"))
        calls = _int(op.get("calls"))
        label = " " + ", ".join(s for s in (f"{percent:.1f} %" if percent is not None else "",
                                           f"{calls} calls" if calls is not None else "") if s)
        ax.annotate(label, (value, i), va="center", fontsize=7.5, xytext=(2, 0), textcoords="offset points")
    ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1)
    by = _by(top)
    ax.set_xlabel(f"{by} per step (ms) of {_text(top.get('variant'))}")
    ax.grid(axis="x", alpha=0.3)
    return fig


# (title, caption, function) in report order.
_PLOTS = (
    ("Step time per variant", "Median training-step time of each variant that ran, with the p20-p80 range; "
     "the label gives the speed-up over the baseline.", _plot_step_times),
    ("Where the step goes", "Median time of each phase of the step per variant (forward includes the loss); "
     "the black tick is the median whole step, which need not equal the sum of the phase medians.", _plot_phases),
    ("Batch sweep", "Throughput against batch size, peak memory on the right axis where known; batch sizes that "
     "ran out of memory are marked on the x axis.", _plot_batch_sweep),
    ("Top ops", "The operators with the most self time in one step of the profiled variant.", _plot_top_ops),
)


# ---------------------------------------------------------------------------------------------------------
# HTML.
# ---------------------------------------------------------------------------------------------------------

def _html_run(record: Mapping) -> list[str]:
    run, flops, peak = _section(record, "run"), _section(record, "flops"), _section(record, "peak_tflops")
    params = _int(run.get("parameters"))
    shape = run.get("input_shape")
    budget = _finite(run.get("budget_s"))
    fields = [("model", run.get("model")), ("data", run.get("data")),
              ("device", f"{_text(run.get('device_name'))} ({_text(run.get('device'))})"),
              ("batch size", run.get("batch_size")),
              ("input shape", " x ".join(str(s) for s in shape) if isinstance(shape, (list, tuple)) else None),
              ("parameters", f"{params:,}" if params is not None else None),
              ("FLOPs per step", f"{_si(flops.get('per_step'), 'FLOP')} (forward {_si(flops.get('forward'), 'FLOP')}, "
               f"{_text(flops.get('method'))})" if flops else None),
              ("peak TFLOP/s", ", ".join(f"{k} {_fmt(peak.get(k), '.4g')}" for k in ("float32", "tf32", "bfloat16",
                                                                                 "float16") if k in peak)
               + (f" ({peak.get('source')})" if peak.get("source") else "") if peak else "not known"),
              ("steps per variant", f"{_text(run.get('steps'))} timed after {_text(run.get('warmup'))} warm-up; "
               f"numerical check over {_text(run.get('check_steps'))}"),
              ("loss, optimizer", f"{_text(run.get('loss_fn'))}, {_text(run.get('optimizer'))}"),
              ("seed", run.get("seed")), ("world size", run.get("world_size")),
              ("time", f"{_duration(run.get('elapsed_s'))}"
               + (f" of a {_duration(budget)} budget" if budget is not None else "")
               + (", interrupted" if run.get("interrupted") else "")),
              ("started", run.get("started")), ("finished", run.get("finished")),
              ("variants requested", ", ".join(str(v) for v in _list(run.get("variants_requested"))) or None),
              ("versions", ", ".join(f"{k} {v}" for k, v in _section(run, "versions").items()) or None)]
    if record.get("trace"):  # (no "trace ?" line in a run without --trace)
        fields.append(("trace", record.get("trace")))
    return ["<dl>"] + [f"<dt>{_e(k)}</dt><dd>{_e(_text(v))}</dd>" for k, v in fields] + ["</dl>"]


def _html_recommendation(record: Mapping) -> list[str]:
    rec = record.get("recommendation")
    if not isinstance(rec, Mapping):
        return [f'<div class="rec none"><p>No recommendation: {_e(_not_measured(record))}.</p></div>']
    name = _text(rec.get("variant"))
    keep = name == _baseline_name(record)
    speedup = _finite(rec.get("speedup"))
    out = [f'<div class="rec {"keep" if keep else "better"}">',
           f"<p><b>{'Keep' if keep else 'Recommended'}: {_e(name)}</b>"
           + (f" ({speedup:.2f}x)" if speedup is not None and not keep else "") + f". {_e(rec.get('summary'))}</p>"]
    confirmation = _confirmation_sentence(record)
    if confirmation:
        out.append(f"<p>{_e(confirmation)}</p>")
    not_chosen = [item for item in _list(rec.get("not_chosen")) if isinstance(item, Mapping)]
    if not_chosen:
        out.append("<p>Not chosen:</p><ul>" + "".join(f"<li><b>{_e(item.get('variant'))}</b>: {_e(item.get('why'))}"
                                                      "</li>" for item in not_chosen) + "</ul>")
    sentence = _data_bound_sentence(rec)
    if sentence:
        out.append(f'<p class="databound">{_e(sentence)}</p>')
    return out + ["</div>"]


def _html_variants(record: Mapping) -> list[str]:
    variants = _variants(record)
    if not variants:
        return ['<p class="note">No variant measured.</p>']
    baseline, chosen = _baseline_name(record), _recommended(record)
    heads = [("variant", "l"), ("status", "l"), ("median ms", ""), ("p20-p80 ms", "opt"), ("images/s", "opt"),
             ("speed-up", ""), ("data/fwd/bwd/opt ms", "opt"), ("peak MiB", "opt"), ("compile s", "opt"),
             ("setup s", "opt"), ("MFU %", "opt"), ("check", "l")]
    rows = []
    for v in variants:
        name, status = _text(v.get("name")), _text(v.get("status"))
        check, passed = _check(v, baseline)
        rows.append(([(name + (" ◀" if name == chosen else ""), "l"),
                      (_STATUS_SHORT.get(status, status), f"l st-{status}"),
                      (_ms(v.get("median_ms")), ""), (_range(v) or "-", ""), (_rate(v.get("images_per_s")), ""),
                      (_times(_speedup(record, v)), ""), (_split(v), ""), (_mib(v.get("peak_memory")), ""),
                      (_fmt(v.get("compile_s"), ".1f"), ""), (_fmt(v.get("setup_s"), ".1f"), ""),
                      (_mfu(v.get("mfu")), ""),
                      (check, "l fail" if passed is False else "l", _check_detail(v.get("check")))],
                     "best" if name == chosen else "", _note(v)))
    empty = [i for i, (head, _) in enumerate(heads) if head in _EMPTY_WHEN_DASHES
             and all(cells[i][0] == "-" for cells, *_ in rows)]  # e.g. no peak memory or MFU on the CPU
    heads = [h for i, h in enumerate(heads) if i not in empty]
    rows = [([c for i, c in enumerate(cells) if i not in empty], *rest) for cells, *rest in rows]
    left_out = ", ".join(h for h, cls in heads if "opt" in cls)
    out = _html_table(heads, rows, narrow_note=f"In a window this narrow, these columns are left out: {left_out}.")
    legend = (("◀ the recommendation; variants" if chosen is not None else "Variants") + ' with a "+" combine '
              "options. A check cell shows its errors and tolerances when the pointer rests on it.")
    out.append(f'<p class="note">{_e(legend)}</p>')
    failed_checks = [(v, v.get("check")) for v in variants if _check(v, baseline)[1] is False]
    for v, check in failed_checks:
        out.append(f'<p class="note">{_e(v.get("name"))}: numerical check failed, {_e(_check_detail(check))}.</p>')
    return out


def _html_sweep_table(record: Mapping) -> list[str]:
    sweep, rows = _section(record, "batch_sweep"), _sweep_rows(record)
    if not rows:
        return []
    stopped = _SWEEP_STOPPED.get(sweep.get("stopped"))
    best = _int(sweep.get("best_batch_size"))
    cells = []
    for row in rows:
        size, status = _int(row.get("batch_size")), _text(row.get("status"))
        marks, error = (_sweep_marks(sweep, row), "") if status == "ok" else ("", _text(row.get("error"), ""))
        cells.append(([(_text(size), ""), (status, f"l st-{status}"), (_ms(row.get("median_ms")), ""),
                       (_sweep_rate(row), ""), (_mib(row.get("peak_memory")), ""), (marks, "l")],
                      "best" if best is not None and size == best else "", error))
    heads = [("batch size", ""), ("status", "l"), ("median ms", ""), ("images/s [p20-p80]", ""), ("peak MiB", ""),
             ("", "l")]
    return ([f'<p class="note">{_e(stopped[0].upper() + stopped[1:])}.</p>'] if stopped else []) + _html_table(heads,
                                                                                                            cells)


def _html_not_drawn(record: Mapping) -> list[str]:
    """Under the step-time plot: the variants that have no bar, and why."""
    drawn = {id(v) for v in _measured(record)}
    missing = [v for v in _variants(record) if id(v) not in drawn]
    if not missing:
        return []
    items = "".join(f"<li><b>{_e(v.get('name'))}</b> ({_e(_text(v.get('status')).replace('_', ' '))}): "
                    f"{_e(_note(v) or 'no step time')}</li>" for v in missing)
    return [f'<p class="note">No bar for:</p><ul class="note">{items}</ul>']


def html_report(record: Mapping) -> str:
    """The HTML report of ``record`` (a profile.json dict) as one self-contained string."""
    record = _check_record(record)
    line, _, interrupted = _header_parts(record)
    line += ", interrupted" if interrupted else ""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>cnnperf profile: {_e(line)}</title>", f"<style>{_CSS}{_PROFILE_CSS}</style></head><body>",
             "<h1>cnnperf profile</h1>", f"<p>{_e(line)}</p>"]
    parts += _html_run(record)
    parts += ["<h2>Recommendation</h2>"] + _html_recommendation(record)
    parts += ["<h2>Variants</h2>"] + _html_variants(record)
    for title, caption, plot in _PLOTS:
        parts += _html_plot(record, title, caption, plot)
        if plot is _plot_step_times:
            parts += _html_not_drawn(record)
        elif plot is _plot_batch_sweep:
            parts += _html_sweep_table(record)
    return "\n".join([*parts, "</body></html>", ""])


def render_html(record: Mapping, path: str | os.PathLike) -> Path:
    """Write the HTML report of ``record`` (a profile.json dict) to ``path`` atomically; returns the path."""
    page = html_report(record)  # drawn in full before the file is touched
    write_text_atomic(path, page)
    return Path(path)


def write_reports(record: Mapping, out_dir: str | os.PathLike, console=None) -> dict[str, Path]:
    """Write ``out_dir``/profile.json and ``out_dir``/report.html (the folder is created if missing), print the
    terminal summary to ``console`` when one is given; returns ``{"json": path, "html": path}``.

    profile.json is written first, so that the record survives a failure to draw the report.
    """
    record = _check_record(record)
    folder = Path(out_dir)
    paths = {"json": folder / "profile.json", "html": folder / "report.html"}
    write_json_atomic(paths["json"], record)  # first: the record itself is kept if drawing the report fails
    render_html(record, paths["html"])
    if console is not None:
        render_terminal({**record, "trace": None}, console)  # said below with its folder
        trace = f" and the trace {folder / record['trace']}" if record.get("trace") else ""
        console.print(f"Wrote {paths['json']}, {paths['html']}{trace}", style="dim", markup=False,
                      highlight=False)
    return paths
