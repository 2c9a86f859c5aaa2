"""The recommendation policy: which measured variant to recommend (:func:`recommend`), why the others were not,
the sentences that say so, and the thresholds it decides by. Pure functions of measured rows (the dicts of a
profile.json record, see SCHEMA.md): no torch, no process state, no import of cnnperf, so that the policy can be
read, tested and changed on its own.
"""

from __future__ import annotations

from typing import Sequence

# No new variant starts after this many seconds (profile(budget="auto") and the command line's default): on the
# CPU the default run (with start-up, the confirmation, top ops and the sweep after the search) then ends inside
# 3 minutes even on a loaded 2-core machine.
DEFAULT_BUDGET_S = {"cpu": 90.0, "cuda": 300.0}
MIN_GAIN = 0.03  # a variant (or one more option) must be 3 % faster to be chosen: less is within run-to-run noise
# A run is noisy when the machine has more runnable threads than cores: this process counts about one, hence the
# half core of slack before the note.
BUSY_SLACK = 0.5


def sound(row: dict) -> bool:
    """Measured, and numerically within its tolerance (the baseline has no check: it is the reference)."""
    return row["status"] == "ok" and (row.get("check") is None or row["check"]["passed"])


def gain(row: dict) -> float:
    return (row.get("speedup") or 0.0) - 1.0


def speedup(row: dict, base_ms: float | None) -> float | None:
    """The row's speed-up over the baseline: its own ``speedup`` (over the baseline timed around it, in the
    interleaved search), else the baseline's median over its median."""
    if row.get("speedup"):
        return row["speedup"]
    return base_ms / row["median_ms"] if base_ms and row.get("median_ms") else None


def data_fraction(row: dict) -> float | None:
    """The share of the step spent waiting for data."""
    phases = row.get("phases_ms")
    if not phases or not row.get("median_ms"):
        return None
    return phases["data"] / max(sum(phases.values()), 1e-12)


def data_bound(row: dict) -> bool:
    phases = row.get("phases_ms")
    return bool(phases) and max(phases, key=phases.get) == "data"


def recommend(rows: Sequence[dict], confirmation: dict | None = None) -> dict:
    """The recommendation from measured rows (the first is the baseline): the fastest numerically sound variant
    if it beats the baseline by MIN_GAIN or more, else the baseline; one line for every variant not chosen.

    ``confirmation``: the baseline and the search's fastest variants timed again in turns, round by round (see
    ``cnnperf.profiler.core.confirmation_of``). It decides: its winner (``confirmation["variant"]``; without
    that key, the search's fastest) stays only if the low end of its rounds' speed-ups (p20) beats the baseline
    by MIN_GAIN, and then the headline ``speedup`` is the rounds' median with its p20-p80 (``speedup_spread``),
    not the search's single pass; otherwise the baseline is recommended and the summary says whether the gain did
    not hold or the rounds disagreed (noise, load).
    """
    rows = [r for r in rows]
    base = rows[0]
    base_ms = base.get("median_ms")
    measured = [r for r in rows if sound(r) and r.get("median_ms")]
    fastest = max(measured, key=lambda r: speedup(r, base_ms) or 0.0, default=base)
    if confirmation is not None and confirmation.get("variant"):
        fastest = next(r for r in measured if r["name"] == confirmation["variant"])
    in_turns = {c["variant"]: c for c in (confirmation or {}).get("contenders", [])}
    chosen = fastest if (speedup(fastest, base_ms) or 0.0) >= 1 + MIN_GAIN else base
    unconfirmed = None
    low = confirmation.get("speedup_p20", confirmation["speedup"]) if confirmation is not None else None
    if confirmation is not None and chosen is not base and low < 1 + MIN_GAIN:
        unconfirmed, chosen = chosen, base
    headline = speedup(chosen, base_ms) if chosen is not base else (1.0 if base_ms else None)
    spread, source = None, "search"
    if confirmation is not None and chosen is not base:  # the headline: measured in turns, with its spread
        headline, source = confirmation["speedup"], "confirmed in turns"
        if "speedup_p20" in confirmation:
            spread = [confirmation["speedup_p20"], confirmation["speedup_p80"]]
    not_chosen = []
    for row in rows:
        if row is chosen:
            continue
        why = _why_not(row, chosen, base)
        if row["name"] in in_turns and row is not unconfirmed:
            figures = {**in_turns[row["name"]], "rounds": confirmation["rounds"]}
            why = (f"{speedup(row, base_ms):.2f}x in the search, {_in_turns(figures)} when timed again in turns "
                   f"with {base['name']} and {fastest['name']} ({confirmation['speedup']:.2f}x)")
        if row is unconfirmed:
            why = (f"{speedup(row, base_ms):.2f}x in the search, but {_in_turns(confirmation)} when timed "
                   f"again in turns with {base['name']}: " + ("not a gain that holds"
                                                              if confirmation["speedup"] < 1 + MIN_GAIN else
                                                              "not reliably faster (the rounds disagree)"))
        not_chosen.append({"variant": row["name"], "why": why})
    fraction = data_fraction(base)
    summary = _summary(chosen, base, headline)
    if unconfirmed is not None:
        search = speedup(unconfirmed, base_ms)
        if confirmation["speedup"] < 1 + MIN_GAIN:
            summary = (f"Keep {base['name']}: {unconfirmed['name']} measured {search:.2f}x faster in the search but "
                       f"only {_in_turns(confirmation)} when timed again in turns with it; the machine's speed "
                       "changed during profiling (other jobs?). Profile again on a quiet machine.")
        else:
            summary = (f"Keep {base['name']}: no variant is reliably faster here. {unconfirmed['name']} measured "
                       f"{search:.2f}x in the search and {_in_turns(confirmation)} when timed again in turns with "
                       f"it, but its slowest rounds are within {MIN_GAIN:.0%} of {base['name']}: the timings are "
                       "noisy (a loaded machine?). Profile again on a quiet machine, or with a larger --budget.")
    elif confirmation is not None and chosen is not base:
        search = speedup(chosen, base_ms)
        summary = (f"Use {chosen['name']}: {_in_turns(confirmation)} faster than {base['name']}, timed in turns "
                   f"({confirmation['baseline_ms']:.4g} -> {confirmation['variant_ms']:.4g} ms per step; the search "
                   f"measured {search:.2f}x), within the {(chosen.get('check') or {}).get('precision', 'float32')} "
                   "tolerance of the numerical check.")
    if data_bound(base):
        summary += (f" The data loader is the bottleneck: the baseline step spends {fraction:.0%} of its time "
                    "waiting for the next batch.")
    return {"variant": chosen["name"], "speedup": headline, "speedup_spread": spread, "speedup_source": source,
            "summary": summary, "data_bound": data_bound(base), "data_fraction": fraction, "not_chosen": not_chosen,
            "confirmation": confirmation}


def _in_turns(confirmation: dict) -> str:
    """``1.84x (p20-p80 1.70-1.95 over 6 rounds)``, or ``1.84x`` for a confirmation without per-round figures."""
    text = f"{confirmation['speedup']:.2f}x"
    if "speedup_p20" in confirmation:
        text += (f" (p20-p80 {confirmation['speedup_p20']:.2f}-{confirmation['speedup_p80']:.2f} over "
                 f"{confirmation['rounds']} rounds)")
    return text


def _why_not(row: dict, chosen: dict, base: dict) -> str:
    if row["status"] == "failed":
        return f"failed: {row['error']}"
    if row["status"] in ("skipped", "not_applicable"):
        return f"{row['status'].replace('_', ' ')}: {row['reason']}"
    check = row.get("check")
    if check is not None and not check["passed"]:
        if check["loss_err"] > check["loss_tol"]:
            return (f"numerically off: loss error {check['loss_err']:.3g} > {check['loss_tol']:g} "
                    f"({check['precision']} tolerance)")
        return (f"numerically off: gradient error {check['grad_err']:.3g} > {check['grad_tol']:g} "
                f"({check['precision']} tolerance; worst: {check['worst_param']})")
    base_ms = base["median_ms"]
    own = speedup(row, base_ms)
    ratio = (speedup(chosen, base_ms) or 1.0) / own  # the row's step time over the chosen's
    if chosen is base and own > 1:
        return (f"{own:.3f}x over {base['name']}: less than the "
                f"{MIN_GAIN:.0%} that counts as a real gain")
    if row is base:
        return f"the baseline: {ratio:.2f}x the step time of {chosen['name']}"
    return f"slower here: {ratio:.2f}x the step time of {chosen['name']}"


def _summary(chosen: dict, base: dict, headline: float | None) -> str:
    if chosen is base:
        return (f"Keep {base['name']}: no variant measured was {MIN_GAIN:.0%} or more faster and numerically "
                f"sound ({base['median_ms']:.4g} ms per step).")
    check = chosen.get("check") or {}
    return (f"Use {chosen['name']}: {headline:.2f}x faster than {base['name']} "
            f"({chosen.get('baseline_ms') or base['median_ms']:.4g} -> {chosen['median_ms']:.4g} ms per step), "
            f"within the {check.get('precision', 'float32')} tolerance of the numerical check.")


def busy(load: float | None, cpus: int | None) -> str | None:
    """A warning when other processes compete for the CPU: more runnable threads than cores (this process
    counts about one) make every timing noisy, and CPU threads of two PyTorch processes slow each other
    down many times over."""
    if load is None or not cpus or load <= cpus + BUSY_SLACK:
        return None
    return (f"Note: the machine was busy when profiling started (load average {load:.1f} on {cpus} CPUs): "
            "other processes compete for the cores, so these timings are noisy.")


def drifting_allocator(dynamic: bool | None, environment: str) -> str | None:
    """A note when CPU timings ran under glibc malloc's dynamic mmap threshold (see :mod:`cnnperf._malloc`):
    the step times depend on the process's allocation history, in this run and in the user's training;
    ``environment``: the variables that fix it."""
    if not dynamic:
        return None
    return ("Note: glibc malloc adapts its mmap threshold to this process's allocation history, so CPU step "
            "times drift within a run and differ between runs (the digits ConvNet's bf16 + channels_last step: "
            "12-14 ms in some processes, 6-10 ms with the thresholds fixed). For steadier steps, here and in "
            f"training, start Python with {environment} (or preload jemalloc or tcmalloc).")


def describe(row: dict) -> str:
    """A row as one line of the progress log."""
    if row["status"] != "ok":
        return f"  {row['name']}: {row['status']}: {row['error'] or row['reason']}"
    check = row.get("check")
    verdict = "" if check is None else ("  check ok" if check["passed"] else "  check FAILED")
    return f"  {row['name']}: {row['median_ms']:.4g} ms/step{verdict}"
