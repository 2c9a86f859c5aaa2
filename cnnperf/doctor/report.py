"""The doctor's reports, made from a doctor.json record (a plain dict, see SCHEMA.md) and nothing else.

- :func:`write_json_atomic`: the record as strict JSON (NaN and inf become ``null``), written atomically.
- :func:`render_terminal`: a rich summary that fits the terminal (plain lines in a log): header, per-epoch
  table with the best epoch marked, findings by severity with their evidence and advice, validation metrics and
  a compact confusion matrix, a one-line verdict.
- :func:`render_html`: one self-contained HTML file (inline CSS, PNG plots embedded as base64, no script, no
  external asset): findings with all their advice, learning curves, per-layer gradient norms (heat map),
  update-to-weight ratios, dead-ReLU fractions, the confusion matrix, the LR range test.
- :func:`write_reports`: doctor.json and report.html into a folder, and the terminal summary.

Every part of the record may be missing or null (a run stopped by Ctrl-C in its first epoch has no epochs, no
metrics, no layer statistics): the terminal says so in one line, the HTML replaces the plot by a short note.
The plots are drawn on :class:`matplotlib.figure.Figure` objects printed by the Agg canvas, never through
pyplot, so the user's interactive backend and pyplot's figure registry are left alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

# The shared pieces, under the short private names this module reads with.
from cnnperf._format import (
    duration as _duration,
    fmt as _fmt,
    int_or_none as _int,
    num as _num,
    pct as _pct,
    plural as _plural,
    text as _text,
)
from cnnperf._io import jsonable, write_json_atomic, write_text_atomic
from cnnperf._terminal import natural_width as _natural_width, print_table as _print_table
from cnnperf.doctor import findings as _detectors
from cnnperf.reporting import (
    CSS as _CSS,
    Skip as _Skip,
    escape as _e,
    figure as _figure,
    html_plot as _html_plot,
    html_table as _html_table,
    section as _section,
)

SCHEMA = "cnnperf.doctor/1"
MOST_SEVERE_FIRST = tuple(reversed(_detectors.SEVERITIES))  # the order of every findings listing
CONFUSION_MAX_CLASSES = 20  # above this the terminal leaves the confusion matrix to the HTML report
UPDATE_RULE_OF_THUMB = 1e-3  # an update of about 1e-3 of the weight per step is the usual healthy range

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SEVERITY_COLOUR = {"error": "#c62828", "warning": "#e65100", "info": "#1565c0"}


# ---------------------------------------------------------------------------------------------------------
# Reading the record: lenient about what is missing, never about what it is given.
# ---------------------------------------------------------------------------------------------------------

def _check_record(record: Any) -> Mapping:
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a doctor.json dict, got {type(record).__name__}")
    schema = record.get("schema")
    if schema is not None and schema != SCHEMA:
        raise ValueError(f"record has schema {schema!r}; these renderers read {SCHEMA!r}")
    return record


def _epochs(record: Mapping) -> list[Mapping]:
    epochs = _section(record, "history").get("epochs") or []
    return [e for e in epochs if isinstance(e, Mapping)]


def _findings(record: Mapping) -> list[Mapping]:
    """The findings, most severe first (the engine's order kept within a severity)."""
    findings = [f for f in record.get("findings") or [] if isinstance(f, Mapping)]
    rank = {s: i for i, s in enumerate(MOST_SEVERE_FIRST)}
    return sorted(findings, key=lambda f: rank.get(f.get("severity"), len(MOST_SEVERE_FIRST)))


def _advice(finding: Mapping) -> list[str]:
    advice = finding.get("advice") or []
    return [advice] if isinstance(advice, str) else [str(a) for a in advice if a is not None]


def _header_parts(record: Mapping) -> tuple[str, bool]:
    run = _section(record, "run")
    done, planned = _int(run.get("epochs_done")), _int(run.get("epochs"))
    epochs = f"{_text(done)}/{_text(planned)} epochs" if planned is not None else f"{_text(done)} epochs"
    line = (f"{_text(run.get('model'))} on {_text(run.get('data'))}, {_text(run.get('device'))}: "
            f"{epochs} in {_duration(run.get('seconds'))}")
    return line, bool(run.get("interrupted"))


def header(record: Mapping) -> str:
    """One line: model, data, device, epochs done, time, and whether the run was interrupted."""
    line, interrupted = _header_parts(record)
    return line + (", interrupted" if interrupted else "")


def verdict(record: Mapping) -> tuple[str, str]:
    """(level, sentence): level is the worst severity found ("error", "warning") or "ok"."""
    counts = {s: 0 for s in MOST_SEVERE_FIRST}
    for f in _findings(record):
        if f.get("severity") in counts:
            counts[f.get("severity")] += 1
    run = _section(record, "run")
    partial = ""
    if run.get("interrupted"):
        done = _plural(_int(run.get("epochs_done")) or 0, "epoch")
        partial = f" (the run was interrupted after {done}: the findings cover only what was seen)"
    if counts["error"] or counts["warning"]:
        parts = [_plural(counts[s], s) for s in ("error", "warning") if counts[s]]
        level = "error" if counts["error"] else "warning"
        return level, f"{' and '.join(parts)}: see the findings and their advice{partial}"
    notes = f", {_plural(counts['info'], 'note')}" if counts["info"] else ""
    return "ok", f"No problems found{notes}{partial}"


# ---------------------------------------------------------------------------------------------------------
# Terminal.
# ---------------------------------------------------------------------------------------------------------

def render_terminal(record: Mapping, console) -> None:
    """Print the summary of ``record`` (a doctor.json dict) to ``console`` (a :class:`rich.console.Console`)."""
    from rich import box
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    record = _check_record(record)
    line, interrupted = _header_parts(record)
    title = Text("cnnperf doctor: ", style="bold")
    title.append(line)
    if interrupted:
        title.append(", interrupted", style="bold red")
    console.print(title)

    epochs = _epochs(record)
    best, stop = _int(record.get("best_epoch")), _int(record.get("early_stop_epoch"))
    if epochs:
        heads = [("epoch", "right"), ("train loss", "right"), ("train acc", "right"), ("val loss", "right"),
                 ("val acc", "right"), ("lr", "right"), ("time", "right")]
        rows, notes = [], []
        for e in epochs:
            n = _int(e.get("epoch"))
            marks = [m for m, at in (("◀ best", best), ("early stop", stop)) if at is not None and n == at]
            rows.append(([_text(n), _fmt(e.get("train_loss")), _pct(e.get("train_acc")), _fmt(e.get("val_loss")),
                          _pct(e.get("val_acc")), _fmt(e.get("lr"), ".3g"), _duration(e.get("seconds"))],
                         "bold green" if n is not None and n == best else None))
            notes.append((f"epoch {_text(n)}", ", ".join(marks), ""))
        _print_table(console, heads, rows, notes, optional=("time", "lr", "train acc"), title="Epochs")
    else:
        console.print("[dim]No epoch finished: no per-epoch history.[/dim]")

    findings = _findings(record)
    if findings:
        console.print("Findings")
        for f in findings:  # blocks, not a table: evidence and advice are sentences that a column would squeeze
            severity = _text(f.get("severity"))
            head = Text("  ")
            head.append(severity, style=_SEVERITY_STYLE.get(severity, ""))
            head.append("  ")
            head.append(_text(f.get("title"), ""), style="bold")
            head.append(f"  ({_text(f.get('kind'))})", style="dim")
            console.print(head)
            evidence = _text(f.get("evidence"), "")
            if evidence:
                console.print(Padding(Text(evidence), (0, 0, 0, 4), expand=False))
            advice = Table.grid(padding=(0, 1))  # numbered, wrapped lines hang under their text
            advice.add_column(justify="right", no_wrap=True)
            advice.add_column()
            for i, item in enumerate(_advice(f), 1):
                advice.add_row(f"{i}.", Text(item))
            if advice.row_count:
                console.print(Padding(advice, (0, 0, 0, 4), expand=False))
    else:
        console.print("[dim]No findings.[/dim]")

    metrics = record.get("metrics")
    if isinstance(metrics, Mapping):
        console.print(f"Validation: accuracy {_pct(metrics.get('accuracy'))}, macro precision "
                      f"{_pct(metrics.get('precision_macro'))}, recall {_pct(metrics.get('recall_macro'))}, "
                      f"F1 {_pct(metrics.get('f1_macro'))}")
        cm = metrics.get("confusion_matrix") or []
        classes = [str(c) for c in metrics.get("classes") or []]
        if len(classes) != len(cm):
            classes = [str(i) for i in range(len(cm))]
        table = None
        if 0 < len(cm) <= CONFUSION_MAX_CLASSES:
            table = Table(box=box.SIMPLE, padding=(0, 1), pad_edge=False, show_edge=False)
            table.add_column("true \\ pred", no_wrap=True, max_width=18)
            for j in range(len(cm)):
                table.add_column(str(j), justify="right", no_wrap=True)
            for i, row in enumerate(cm):
                cells = []
                for j, count in enumerate(row):
                    style = "bold green" if i == j else ("red" if _num(count) > 0 else "dim")
                    cells.append(Text(_fmt(count, ".0f"), style))
                table.add_row(Text(str(i) if classes[i] == str(i) else f"{i} {classes[i]}"), *cells)
            if _natural_width(console, table) > console.width:
                table = None
        if table is not None:
            console.print("Confusion matrix (rows: true class, columns: predicted class):")
            console.print(table)
        elif cm:
            console.print(f"[dim]Confusion matrix: {len(cm)} classes, too many for the terminal; "
                          "see report.html.[/dim]")
    else:
        console.print("[dim]No validation metrics.[/dim]")

    level, sentence = verdict(record)
    style = {"error": "bold red", "warning": "bold yellow"}.get(level, "bold green")
    console.print(Text(f"Verdict: {sentence}", style=style))


# ---------------------------------------------------------------------------------------------------------
# Plots: each function returns a Figure, or raises _Skip with the note the report shows instead.
# ---------------------------------------------------------------------------------------------------------


def _matrix(rows: Any, columns: int, what: str):
    """``rows`` ([[number] per step]) as a float array of shape (steps, columns); None becomes NaN."""
    import numpy as np

    rows = [] if rows is None else list(rows)
    if not rows:
        raise _Skip(f"no {what} recorded")
    for r in rows:
        if isinstance(r, (str, bytes, Mapping)) or not hasattr(r, "__len__"):
            raise _Skip(f"{what} is malformed: a row is {type(r).__name__}, not a list of numbers")
        if len(r) != columns:
            raise _Skip(f"{what} is malformed: a row of {len(r)} values for {columns} names")
    return np.array([[_num(v) for v in r] for r in rows], dtype=float).reshape(len(rows), columns)


def _steps_and_names(block: Mapping, key: str, what: str):
    names = [str(n) for n in block.get("names") or []]
    if not names:
        raise _Skip(f"no {what} recorded")
    values = _matrix(block.get(key), len(names), what)
    steps = [_int(s) for s in block.get("steps") or []]
    if len(steps) != len(values):
        steps = list(range(len(values)))
    return steps, names, values


def _step_ticks(ax, steps: Sequence) -> None:
    """x ticks (the x axis is the index of the sample) at up to 8 samples, labelled with their training step."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def label(x, _pos):
        i = int(round(x))
        return _text(steps[i]) if abs(x - i) < 1e-6 and 0 <= i < len(steps) else ""

    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.set_xlabel("training step (sampled)")


def _lines(fig, ax, x, values, names: Sequence[str], what: str) -> None:
    """One line per column of ``values``: a legend for up to 10, else colours by depth with a colour bar."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(names)
    if n <= 10:
        for j, name in enumerate(names):
            ax.plot(x, values[:, j], marker="." if len(x) < 30 else None, linewidth=1.2, label=name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        cmap, norm = colormaps["viridis"], Normalize(0, n - 1)
        for j in range(n):
            ax.plot(x, values[:, j], color=cmap(norm(j)), linewidth=0.9, alpha=0.85)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"{what} index (0 = first)")


def _plot_learning_curves(record: Mapping):
    import numpy as np

    epochs = _epochs(record)
    if not epochs:
        raise _Skip("no epoch finished")
    x = [(_int(e.get("epoch")) or i + 1) for i, e in enumerate(epochs)]
    best, stop = _int(record.get("best_epoch")), _int(record.get("early_stop_epoch"))
    fig = _figure(9.5, 3.4)
    axes = fig.subplots(1, 2)
    for ax, key, label, scale in ((axes[0], "loss", "loss", 1.0), (axes[1], "acc", "accuracy (%)", 100.0)):
        for split, style in (("train", "-o"), ("val", "-s")):
            y = np.array([_num(e.get(f"{split}_{key}")) for e in epochs]) * scale
            if np.isfinite(y).any():
                ax.plot(x, y, style, markersize=3.5, linewidth=1.4, label=split)
        if best is not None:
            ax.axvline(best, color="#2e7d32", linestyle="--", linewidth=1, label=f"best epoch {best}")
        if stop is not None:
            ax.axvline(stop, color="#c62828", linestyle=":", linewidth=1.2, label=f"early stop {stop}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _plot_grad_norm_heatmap(record: Mapping):
    import numpy as np
    from matplotlib import colormaps

    steps, names, values = _steps_and_names(_section(record, "history", "layers"), "grad_norm",
                                            "per-layer gradient norms")
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(values) & (values > 0), np.log10(values), np.nan).T  # layers x steps
    if not np.isfinite(logs).any():
        raise _Skip("no positive finite gradient norm recorded")
    n = len(names)
    fig = _figure(9.5, min(max(0.16 * n + 1.4, 2.6), 14.0))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#bdbdbd")
    image = ax.imshow(np.ma.masked_invalid(logs), aspect="auto", interpolation="nearest", cmap=cmap)
    fig.colorbar(image, ax=ax, label="log10 gradient norm")
    every = max(1, math.ceil(n / 80))
    ax.set_yticks(range(0, n, every), names[::every], fontsize=7 if n <= 30 else 5.5)
    _step_ticks(ax, steps)
    ax.set_title("grey: zero, missing or non-finite", fontsize=8, loc="right")
    return fig


def _plot_update_to_weight(record: Mapping):
    import numpy as np

    steps, names, values = _steps_and_names(_section(record, "history", "layers"), "update_to_weight",
                                            "update-to-weight ratios")
    values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    if not np.isfinite(values).any():
        raise _Skip("no positive finite update-to-weight ratio recorded")
    fig = _figure(9.5, 3.8)
    ax = fig.subplots()
    x = np.arange(len(steps))
    _lines(fig, ax, x, values, names, "layer")
    ax.axhline(UPDATE_RULE_OF_THUMB, color="black", linestyle="--", linewidth=1)
    ax.annotate("1e-3 rule of thumb", (0, UPDATE_RULE_OF_THUMB), xytext=(2, 3), textcoords="offset points",
                fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("|update| / |weight| per step")
    ax.grid(alpha=0.3)
    _step_ticks(ax, steps)
    return fig


def _plot_dead_relu(record: Mapping):
    import numpy as np

    steps, names, values = _steps_and_names(_section(record, "history", "relu"), "dead_fraction",
                                            "dead-ReLU fractions")
    if not np.isfinite(values).any():
        raise _Skip("no finite dead-ReLU fraction recorded")
    fig = _figure(9.5, 3.4)
    ax = fig.subplots()
    _lines(fig, ax, np.arange(len(steps)), 100 * values, names, "ReLU")
    ax.set_ylim(-2, 102)
    ax.set_ylabel("dead units (%)")
    ax.grid(alpha=0.3)
    _step_ticks(ax, steps)
    return fig


def _plot_confusion(record: Mapping):
    import numpy as np

    metrics = record.get("metrics")
    cm = metrics.get("confusion_matrix") if isinstance(metrics, Mapping) else None
    if not cm:
        raise _Skip("no confusion matrix (no validation metrics)")
    counts = _matrix(cm, len(cm), "confusion matrix")
    n = len(cm)
    classes = [str(c) for c in metrics.get("classes") or []]
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    totals = np.nansum(counts, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, counts / totals, 0.0)
    side = min(max(0.42 * n + 2.2, 3.8), 11.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    if n <= CONFUSION_MAX_CLASSES:
        size = 8 if n <= 12 else 6
        for i in range(n):
            for j in range(n):
                if math.isfinite(counts[i, j]):
                    ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", fontsize=size,
                            color="white" if share[i, j] > 0.5 else "black")
    ticks = range(n) if n <= 40 else range(0, n, math.ceil(n / 40))
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center",
                  fontsize=7)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return fig


def _plot_lr_finder(record: Mapping):
    import numpy as np

    finder = record.get("lr_finder")
    if not isinstance(finder, Mapping):
        raise _Skip("no LR range test in this run")
    lrs = np.array([_num(v) for v in finder.get("lrs") or []], dtype=float)
    losses = np.array([_num(v) for v in finder.get("losses") or []], dtype=float)
    if len(lrs) != len(losses):
        raise _Skip(f"LR range test is malformed: {len(lrs)} learning rates for {len(losses)} losses")
    keep = np.isfinite(lrs) & (lrs > 0) & np.isfinite(losses)
    if keep.sum() < 2:
        raise _Skip("LR range test has fewer than 2 finite points")
    lrs, losses = lrs[keep], losses[keep]
    fig = _figure(7.5, 3.4)
    ax = fig.subplots()
    ax.plot(lrs, losses, linewidth=1.4, label="loss")
    ax.set_xscale("log")
    suggested = _num(finder.get("suggested_lr"))
    if math.isfinite(suggested) and suggested > 0:
        ax.axvline(suggested, color="#c62828", linestyle="--", linewidth=1, label=f"suggested lr {suggested:.3g}")
    low, high, first = losses.min(), losses.max(), losses[0]
    if first > low and high > low + 2 * (first - low):  # the blow-up at the end would flatten the useful part
        ax.set_ylim(low - 0.05 * (first - low), low + 2 * (first - low))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


# (title, caption, function) in report order.
_PLOTS = (
    ("Learning curves", "Loss and accuracy per epoch, train and validation; the best epoch and the early-stop "
     "epoch are marked.", _plot_learning_curves),
    ("Gradient norms per layer", "The L2 norm of each parameter's gradient over the sampled steps, log10 colour "
     "scale: vanishing gradients show as dark rows at the first layers, exploding ones as bright columns.",
     _plot_grad_norm_heatmap),
    ("Update-to-weight ratios", "The size of each step's update relative to the weight, per layer, log scale; "
     "far below 1e-3 the layer barely learns, far above it training is unstable.", _plot_update_to_weight),
    ("Dead ReLUs", "The fraction of each ReLU's units that output zero for every input of the sampled batch.",
     _plot_dead_relu),
    ("Confusion matrix", "Validation counts, rows = true class, columns = predicted; colour = share of the row.",
     _plot_confusion),
    ("LR range test", "Loss against a learning rate increased exponentially over a few hundred steps; "
     "the suggested learning rate is marked.", _plot_lr_finder),
)


# ---------------------------------------------------------------------------------------------------------
# HTML.
# ---------------------------------------------------------------------------------------------------------


def _html_run(record: Mapping) -> list[str]:
    run = _section(record, "run")
    fields = [("optimizer", run.get("optimizer")), ("learning rate", _fmt(run.get("lr"), ".3g")),
              ("batch size", run.get("batch_size")), ("gradient clip", _fmt(run.get("clip"), ".3g", "none")),
              ("augmentation", {True: "yes", False: "no"}.get(run.get("augment"))), ("seed", run.get("seed")),
              ("parameters", f"{_int(run.get('parameters')):,}" if _int(run.get("parameters")) is not None
               else None),
              ("train / validation images", f"{_text(run.get('train_size'))} / {_text(run.get('val_size'))}"),
              ("started", run.get("started")), ("finished", run.get("finished")),
              ("versions", ", ".join(f"{k} {v}" for k, v in _section(run, "versions").items()) or None)]
    return ["<dl>"] + [f"<dt>{_e(k)}</dt><dd>{_e(_text(v))}</dd>" for k, v in fields] + ["</dl>"]


def _html_findings(record: Mapping) -> list[str]:
    findings = _findings(record)
    if not findings:
        return ['<p class="note">No findings.</p>']
    out = []
    for f in findings:
        severity = _text(f.get("severity"))
        colour = _SEVERITY_COLOUR.get(severity, "#616161")
        out.append(f'<section class="finding" style="border-left-color:{colour}">')
        out.append(f'<h3><span class="sev" style="background:{colour}">{_e(severity)}</span>{_e(f.get("title"))} '
                   f'<span class="kind">{_e(f.get("kind"))}</span></h3>')
        out.append(f"<p>{_e(f.get('evidence'))}</p>")
        advice = _advice(f)
        if advice:
            out.append("<ol>" + "".join(f"<li>{_e(a)}</li>" for a in advice) + "</ol>")
        if f.get("data"):
            data = json.dumps(jsonable(f.get("data")), indent=1, allow_nan=False, default=str)
            out.append(f"<details><summary>data</summary><pre>{_e(data)}</pre></details>")
        out.append("</section>")
    return out


def _html_epochs(record: Mapping) -> list[str]:
    epochs = _epochs(record)
    if not epochs:
        return ['<p class="note">No epoch finished: no per-epoch history.</p>']
    best, stop = _int(record.get("best_epoch")), _int(record.get("early_stop_epoch"))
    heads = [(h, "") for h in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "time")]
    rows = []
    for e in epochs:
        n = _int(e.get("epoch"))
        marks = ", ".join(m for m, at in (("best", best), ("early stop", stop)) if at is not None and n == at)
        cells = (n, _fmt(e.get("train_loss")), _pct(e.get("train_acc")), _fmt(e.get("val_loss")),
                 _pct(e.get("val_acc")), _fmt(e.get("lr"), ".3g"), _duration(e.get("seconds")))
        rows.append(([(_text(c), "") for c in cells] + [(marks, "l")], "best" if n is not None and n == best else ""))
    return _html_table(heads + [("", "l")], rows)


def _html_metrics(record: Mapping) -> list[str]:
    metrics = record.get("metrics")
    if not isinstance(metrics, Mapping):
        return ['<p class="note">No validation metrics.</p>']
    return ["<p>" + ", ".join(f"{name} <b>{_e(_pct(metrics.get(key)))}</b>" for name, key in (
        ("accuracy", "accuracy"), ("macro precision", "precision_macro"), ("macro recall", "recall_macro"),
        ("macro F1", "f1_macro"))) + "</p>"]


def html_report(record: Mapping) -> str:
    """The HTML report of ``record`` (a doctor.json dict) as one self-contained string."""
    record = _check_record(record)
    level, sentence = verdict(record)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>cnnperf doctor: {_e(header(record))}</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>cnnperf doctor</h1>", f"<p>{_e(header(record))}</p>"]
    parts += _html_run(record)
    parts.append(f'<p class="verdict {level}">{_e(sentence)}</p>')
    parts += ["<h2>Findings</h2>"] + _html_findings(record)
    parts += ["<h2>Epochs</h2>"] + _html_epochs(record)
    parts += ["<h2>Validation metrics</h2>"] + _html_metrics(record)
    for title, caption, plot in _PLOTS:
        parts += _html_plot(record, title, caption, plot)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_html(record: Mapping, path: str | os.PathLike) -> Path:
    """Write the HTML report of ``record`` (a doctor.json dict) to ``path`` atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, html_report(record))
    return path


def write_reports(record: Mapping, out_dir: str | os.PathLike, console=None) -> dict[str, Path]:
    """Write ``out_dir``/doctor.json and ``out_dir``/report.html (the folder is created if missing), print the
    terminal summary to ``console`` when one is given; returns ``{"json": path, "html": path}``.

    The JSON goes first: it is the record itself, and it is kept even if drawing the report fails.
    """
    record = _check_record(record)
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "doctor.json", "html": out_dir / "report.html"}
    write_json_atomic(paths["json"], record)
    render_html(record, paths["html"])
    if console is not None:
        from rich.text import Text

        render_terminal(record, console)
        console.print(Text(f"Wrote {paths['json']} and {paths['html']}", style="dim"))
    return paths
