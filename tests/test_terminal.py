"""cnnperf._terminal: tables that fit a terminal, and plain lines in a pipe or a log."""

import io

import pytest
from rich.console import Console

from cnnperf import _terminal

HEADS = [("name", "left"), ("ms", "right"), ("spread", "right"), ("split", "right"), ("check", "left")]
ROWS = [(["bf16+channels_last", "4.48", "4.42-4.53", "0.28/1.34/2.29/0.54", "ok 0.10"], None),
        (["tf32", "-", "-", "-", "-"], None)]
LONG = ("TF32 is a number format of NVIDIA tensor cores; this run is on the CPU, where float32 matmuls and "
        "convolutions are what they are")
NOTES = [("bf16+channels_last", "", ""), ("tf32", LONG, "dim")]


def _terminal_text(width: int, **kwargs) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, record=True)
    _terminal.print_table(console, HEADS, ROWS, **kwargs)
    return console.export_text()


def _log_text(**kwargs) -> str:
    console = Console(file=io.StringIO(), width=_terminal.LOG_WIDTH, soft_wrap=True, record=True)
    assert _terminal.is_log(console)
    _terminal.print_table(console, HEADS, ROWS, **kwargs)
    return console.export_text()


def test_a_wide_terminal_shows_every_column_and_the_notes_in_a_column():
    text = _terminal_text(200, notes=NOTES, optional=("split", "spread"))
    head = text.splitlines()[0].split()
    assert head == ["name", "ms", "spread", "split", "check", "note"]
    tf32 = [line for line in text.splitlines() if line.startswith("tf32")][0]
    note = tf32.split("   ")[-1].strip()
    assert note == LONG[:_terminal.NOTE_CHARS - 1] + "…"  # cut to NOTE_CHARS characters
    assert "not shown" not in text


def test_a_narrow_terminal_drops_the_optional_columns_in_order_and_says_so():
    text = _terminal_text(50, notes=NOTES, optional=("split", "spread"))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 50
    assert lines[0].split() == ["name", "ms", "spread", "check"]  # "split" went first, that was enough
    assert [line.split()[:2] for line in lines[2:4]] == [["bf16+channels_last", "4.48"], ["tf32", "-"]]
    assert "  (not shown at this width: split)" in lines
    note = [line for line in lines if line.startswith("  tf32: ")][0]  # under the table, cut to the width
    assert note.startswith("  tf32: TF32 is a number format") and note.endswith("…") and len(note) <= 50


def test_a_note_column_may_cost_the_first_optional_columns():
    text = _terminal_text(80, notes=[("a", "", ""), ("tf32", "needs an Ampere or newer GPU", "")],
                          optional=("split", "spread"), drop_for_notes=1)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms", "spread", "check", "note"]
    assert lines[3].rstrip().endswith("needs an Ampere or newer GPU") and max(len(line) for line in lines) <= 80


def test_a_log_keeps_every_column_and_every_note_whole():
    text = _log_text(notes=NOTES, optional=("split", "spread"))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms", "spread", "split", "check"]
    assert f"  tf32: {LONG}" in lines and "…" not in text  # a long note: a whole line under the table
    short = _log_text(notes=[("a", "", ""), ("tf32", "not applicable", "")])
    assert short.splitlines()[0].split()[-1] == "note" and "not applicable" in short.splitlines()[3]


def test_a_title_is_a_line_above_the_table_and_bad_arguments_are_named():
    assert _terminal_text(80, title="Epochs").splitlines()[0] == "Epochs"
    console = Console(file=io.StringIO(), width=80)
    with pytest.raises(ValueError, match=r"optional columns \['nope'\] are not among the heads"):
        _terminal.print_table(console, HEADS, ROWS, optional=("nope",))
    with pytest.raises(ValueError, match="1 notes for 2 rows"):
        _terminal.print_table(console, HEADS, ROWS, notes=[("a", "b", "")])


def test_make_console_is_a_log_console_off_a_terminal():
    console = _terminal.make_console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal and _terminal.is_log(console) and console.width == _terminal.LOG_WIDTH
    assert not _terminal.is_log(Console(file=io.StringIO(), width=80, force_terminal=True))


def test_one_line():
    assert _terminal.one_line("a\n  b\tc ") == "a b c"
    assert _terminal.one_line("abcdef", 4) == "abc…" and _terminal.one_line("abcd", 4) == "abcd"
    assert _terminal.one_line(None) == ""
