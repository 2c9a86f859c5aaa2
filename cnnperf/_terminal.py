"""The consoles and tables of every command: output that fits the terminal, and plain lines in a pipe or a log.

- :func:`make_console`: a :class:`rich.console.Console` on stdout or stderr. On a terminal it has the terminal's
  width; anywhere else (a pipe, a file, a CI log) it is a *log console*: text is never wrapped or cut (rich's
  ``soft_wrap``) and tables take the width their content needs.
- :func:`is_log`: whether a console is a log console (any console made with ``soft_wrap=True``).
- :func:`print_table`: a table that fits its console: on a terminal, optional columns go (in the order given)
  while it is too wide, and each row's note is a last column where there is room, else a line under the table
  cut to the width; on a log console every column stays and no note is cut.
- :func:`one_line`: a note as one line (whitespace collapsed), cut with an ellipsis where a limit is given.
- :func:`natural_width`: the columns a renderable (a table) takes when nothing limits it.

No torch: the report modules use it without importing torch.
"""

from __future__ import annotations

from typing import Any, Sequence

# A log console's width: the most a table may take before rich folds it (no command's table comes close).
LOG_WIDTH = 1000
# On a terminal a row's note is cut to this many characters, in its column or under the table (reports and
# records have it whole).
NOTE_CHARS = 70


def make_console(stderr: bool = False):
    """A rich Console on stdout (or stderr): the terminal's width on a terminal, else a log console."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=LOG_WIDTH, soft_wrap=True)


def is_log(console) -> bool:
    """True for a console whose lines are not wrapped to a width (a log console of :func:`make_console`)."""
    return bool(getattr(console, "soft_wrap", False))


def one_line(x: Any, limit: int | None = None) -> str:
    """``x`` as one line with its whitespace collapsed; cut to ``limit`` characters with an ellipsis if given."""
    text = " ".join(("" if x is None else str(x)).split())
    return text if limit is None or len(text) <= limit else text[:max(limit - 1, 0)].rstrip() + "…"


def natural_width(console, renderable) -> int:
    """The columns ``renderable`` takes on ``console`` when nothing limits it (the console's width would clamp
    the measurement)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(width=10_000), renderable).maximum


def print_table(console, heads: Sequence[tuple[str, str]], rows: Sequence[tuple[Sequence, str | None]],
                notes: Sequence[tuple[str, str, str]] | None = None, *, optional: Sequence[str] = (),
                drop_for_notes: int = 0, note_min: int = 24, title: str | None = None) -> None:
    """Print a table that fits ``console``.

    ``heads`` are (name, justify) per column, ``rows`` (cells, style) with one cell per head (str or rich
    Text), ``notes`` (label, text, style) per row or None. ``optional`` names the columns that may go on a
    narrow terminal, the first to go first. On a terminal: the notes are a last "note" column, cut to the width
    left, where that leaves at least ``note_min`` columns (or the longest note), once at most the first
    ``drop_for_notes`` optional columns are gone; else the optional columns go while the table is too wide and
    each note is a line under it, cut to the width. On a log console (:func:`is_log`): every column, and the
    notes whole: in their column when none is longer than :data:`NOTE_CHARS`, else each a line under the
    table. ``title`` is a line above the table, wrapped like any text.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    names = [h for h, _ in heads]
    unknown = [name for name in optional if name not in names]
    if unknown:
        raise ValueError(f"optional columns {unknown} are not among the heads {names}")
    notes = list(notes) if notes is not None else [("", "", "")] * len(rows)
    if len(notes) != len(rows):
        raise ValueError(f"{len(notes)} notes for {len(rows)} rows")
    log = is_log(console)

    def build(keep: list[int], note_width: int | None) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for i in keep:
            table.add_column(heads[i][0], justify=heads[i][1], no_wrap=i != 0, overflow="fold")
        if note_width is not None:
            table.add_column("note", no_wrap=True, overflow="ellipsis", max_width=note_width)
        for (cells, style), (_, note, note_style) in zip(rows, notes):
            extra = [Text(one_line(note, note_width or 1), style=note_style)] if note_width is not None else []
            table.add_row(*[cells[i] for i in keep], *extra, style=style)
        return table

    if title:
        console.print(title)
    keep = list(range(len(heads)))
    longest = max((len(one_line(note)) for _, note, _ in notes), default=0)
    if log and 0 < longest <= NOTE_CHARS:  # short notes stay in their column: nothing is cut
        console.print(build(keep, longest))
        return
    wanted = min(longest, NOTE_CHARS)
    if not log and wanted:
        for name in (None, *optional[:drop_for_notes]):  # a note column, at the cost of the first optional ones?
            if name is not None:
                keep.remove(names.index(name))
            room = console.width - natural_width(console, build(keep, 1)) + 1
            if room >= min(wanted, note_min):
                console.print(build(keep, min(room, NOTE_CHARS)))
                return
        keep = list(range(len(heads)))
    for name in optional if not log else ():  # the notes go under the table, which keeps what fits
        if natural_width(console, build(keep, None)) <= console.width:
            break
        keep.remove(names.index(name))
    console.print(build(keep, None))
    left_out = [name for i, name in enumerate(names) if i not in keep]
    if left_out:
        console.print(Text(f"  (not shown at this width: {', '.join(left_out)})", style="dim"))
    for label, note, style in notes:
        if note:
            line = Text(f"  {label}: " if label else "  ", style="bold")
            line.append(one_line(note, None if log else max(16, console.width - len(line))), style=style)
            console.print(line, no_wrap=not log, overflow="ellipsis")

