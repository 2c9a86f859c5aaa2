"""The profiler's report renderers (cnnperf.profiler.report) on hand-made profile.json records: strict JSON written
atomically, the HTML report (plots, notes for what is missing, escaping) and the terminal summary at 160 and 80
columns.

The full report is drawn once per module (four plots); the other records have no plot or one.
"""

import base64
import io
import json
import re
import sys

import pytest
from rich.console import Console

from cnnperf._terminal import LOG_WIDTH
from cnnperf.profiler import report

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
COMPILE_ERROR = "BackendCompilerFailed: inductor raised <b>LoweringException</b>: no kernel for aten.foo & co"
MiB = 2 ** 20


def _run(**changes) -> dict:
    run = {"model": "ResNet18", "data": "batch", "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3",
           "batch_size": 256, "input_shape": [256, 3, 224, 224], "steps": 30, "warmup": 5, "check_steps": 3,
           "budget_s": 600.0, "elapsed_s": 302.5, "started": "2025-01-01T00:00:00+00:00",
           "finished": "2025-01-01T00:05:02+00:00", "interrupted": False, "parameters": 11689512, "world_size": 1,
           "variants_requested": ["eager", "channels_last", "bf16", "fp16", "compile", "tf32"],
           "versions": {"torch": "2.6.0", "cnnperf": "0.1.0"}, "loss_fn": "CrossEntropyLoss", "optimizer": "SGD",
           "seed": 0}
    run.update(changes)
    return run


def _variant(name: str, stage: str, status: str = "ok", median: float | None = None, **fields) -> dict:
    options = [] if name == "eager" else name.split("+")
    row = {"name": name, "options": options, "stage": stage, "status": status, "error": None, "reason": None,
           "median_ms": median, "p20_ms": None, "p80_ms": None, "timed_steps": None, "images_per_s": None,
           "speedup": None, "peak_memory": None, "compile_s": None, "setup_s": None, "phases_ms": None,
           "mfu": None, "check": None, "ranks": None}
    if status == "ok":
        row.update(p20_ms=median * 0.98, p80_ms=median * 1.03, timed_steps=30, images_per_s=256e3 / median,
                   speedup=41.8 / median, peak_memory=int(9000 * MiB * median / 41.8), setup_s=0.4,
                   mfu=0.3 * 41.8 / median,
                   phases_ms={"data": 0.2, "forward": 0.33 * median, "backward": 0.55 * median,
                              "optimizer": 0.1 * median})
    row.update(fields)
    return row


def _check(precision: str, passed: bool, grad_err: float, grad_tol: float, loss_err: float = 1e-3,
           loss_tol: float = 1e-2) -> dict:
    return {"passed": passed, "loss_err": loss_err, "grad_err": grad_err, "loss_tol": loss_tol,
            "grad_tol": grad_tol, "worst_param": "layer4.1.conv2.weight", "steps": 3, "precision": precision}


def _full_record() -> dict:
    return {
        "schema": report.SCHEMA,
        "run": _run(world_size=2),
        "flops": {"per_step": 3.64e12, "forward": 1.21e12, "method": "torch.utils.flop_counter"},
        "peak_tflops": {"float32": 67.0, "tf32": 495.0, "bfloat16": 989.0, "float16": 989.0, "source": "H100 SXM"},
        "variants": [
            _variant("eager", "baseline", median=41.8, ranks={"median_ms": [41.8, 46.8], "spread": 0.12}),
            _variant("channels_last", "single", median=38.0),
            _variant("bf16", "single", median=31.0, check=_check("bfloat16", True, 0.012, 0.1)),
            _variant("fp16", "single", median=30.5, check=_check("float16", False, 0.31, 0.1)),
            _variant("compile", "single", "failed", error=COMPILE_ERROR, compile_s=12.5),
            _variant("tf32", "single", "not_applicable", reason="TF32 needs an Ampere or newer GPU; this is a T4."),
            _variant("bf16+channels_last", "combination", median=29.4, compile_s=None, mfu=float("nan"),
                     check=_check("bfloat16", True, 0.015, 0.1)),
        ],
        "baseline": "eager",
        "recommendation": {"variant": "bf16+channels_last", "speedup": 41.9 / 29.9, "speedup_spread": [1.35, 1.45],
                           "speedup_source": "confirmed in turns",
                           "summary": "bf16 autocast with channels_last is 1.40x faster and passes the check.",
                           "data_bound": False, "data_fraction": 0.005,
                           "not_chosen": [{"variant": "fp16", "why": "numerically off: gradient error 0.31 > 0.1"},
                                          {"variant": "compile", "why": "failed: BackendCompilerFailed"},
                                          {"variant": "tf32", "why": "not applicable: needs an Ampere GPU"}],
                           "confirmation": {"variant": "bf16+channels_last", "baseline_ms": 41.9,
                                            "variant_ms": 29.9, "speedup": 41.9 / 29.9,
                                            "speedup_p20": 1.35, "speedup_p80": 1.45,
                                            "round_speedups": [1.33, 1.38, 1.40, 1.41, 1.47],
                                            "rounds": 5, "steps": 10, "seconds": 6.2,
                                            "contenders": [
                                                {"variant": "bf16+channels_last", "speedup": 41.9 / 29.9,
                                                 "speedup_p20": 1.35, "speedup_p80": 1.45, "variant_ms": 29.9,
                                                 "round_speedups": [1.33, 1.38, 1.40, 1.41, 1.47]},
                                                {"variant": "bf16", "speedup": 1.21, "speedup_p20": 1.18,
                                                 "speedup_p80": 1.25, "variant_ms": 34.6,
                                                 "round_speedups": [1.17, 1.2, 1.21, 1.22, 1.26]}]}},
        "top_ops": {"variant": "bf16+channels_last", "by": "self_device_time",
                    "ops": [{"name": f"aten::op_{i}", "self_ms": 10.0 / (i + 1), "calls": 20 - i,
                             "percent": 30.0 / (i + 1)} for i in range(12)]},
        "batch_sweep": {"variant": "bf16+channels_last",
                        "rows": [{"batch_size": b, "status": "ok", "median_ms": 29.4 * b / 256,
                                  "images_per_s": 256e3 / 29.4 * (1 + b / 4096), "peak_memory": 35 * b * MiB,
                                  "error": None} for b in (64, 128, 256, 512)]
                        + [{"batch_size": 1024, "status": "oom", "median_ms": None, "images_per_s": None,
                            "peak_memory": None, "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate"}],
                        "largest_fitting": 512, "best_batch_size": 512},
        "trace": "trace.json",
    }


def _minimal_record() -> dict:
    """Ctrl-C before the first variant finished."""
    return {"schema": report.SCHEMA, "run": _run(interrupted=True, elapsed_s=4.0)}


def _keep_eager_record() -> dict:
    record = _full_record()
    record["variants"] = [record["variants"][0], _variant("channels_last", "single", median=43.0),
                          _variant("bf16", "single", median=41.0, check=_check("bfloat16", True, 0.01, 0.1))]
    record["recommendation"] = {"variant": "eager", "speedup": 1.0, "summary": "Nothing beat eager by 3 % or more.",
                                "data_bound": True, "data_fraction": 0.62, "not_chosen": []}
    record["top_ops"] = record["batch_sweep"] = None
    return record


def _console(width: int) -> Console:
    return Console(record=True, width=width, file=io.StringIO())


def _terminal(record, width: int) -> str:
    console = _console(width)
    report.render_terminal(record, console)
    return console.export_text()


def _row(lines: list[str], first: str) -> str:
    """The one line whose first word is ``first``."""
    (line,) = [line for line in lines if line.split()[:1] == [first]]
    return line


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in PNG.findall(page)]


def _load_strict(path):
    """The JSON file at ``path``, which must hold no NaN or Infinity token."""
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\b(NaN|-?Infinity)\b", text)
    return json.loads(text)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """write_reports of the full record, once: (record, paths, the HTML, the terminal text at 160 columns, whether
    pyplot was imported before)."""
    pyplot_before = "matplotlib.pyplot" in sys.modules
    out = tmp_path_factory.mktemp("profile") / "new"  # not there yet: write_reports creates it
    console = _console(160)
    record = _full_record()
    paths = report.write_reports(record, out, console=console)
    return record, paths, paths["html"].read_text(encoding="utf-8"), console.export_text(), pyplot_before


# ---------------------------------------------------------------------------------------------------------
# profile.json
# ---------------------------------------------------------------------------------------------------------

def test_write_reports_writes_strict_json_and_html(full):
    record, paths, *_ = full
    assert set(paths) == {"json", "html"}
    assert _names(paths["json"].parent) == ["profile.json", "report.html"]  # no temporary file left
    loaded = _load_strict(paths["json"])
    assert loaded == report.jsonable(record)
    assert loaded["schema"] == "cnnperf.profile/1"
    assert loaded["variants"][6]["mfu"] is None  # float("nan") in the record
    assert loaded["variants"][0]["ranks"] == {"median_ms": [41.8, 46.8], "spread": 0.12}
    assert loaded["batch_sweep"]["rows"][4]["status"] == "oom"


def test_the_json_is_kept_when_the_html_fails(tmp_path, monkeypatch):
    def broken(record):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "html_report", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.write_reports(_minimal_record(), tmp_path)
    assert _names(tmp_path) == ["profile.json"]
    assert _load_strict(tmp_path / "profile.json") == _minimal_record()


def test_records_are_checked_at_the_entry(tmp_path):
    with pytest.raises(ValueError, match="cnnperf.profile/1"):
        report.render_html({"schema": "cnnperf.doctor/1", "run": _run()}, tmp_path / "r.html")
    with pytest.raises(ValueError, match="schema None"):
        report.write_reports({"run": _run()}, tmp_path)
    with pytest.raises(ValueError, match="list"):
        report.render_terminal([1, 2], _console(80))
    with pytest.raises(ValueError):
        report.summary_line({"schema": "cnnperf.profile/2"})
    assert _names(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------------------------------------

def test_html_has_a_png_per_plot_and_no_script(full):
    _, _, page, _, pyplot_before = full
    assert pyplot_before or "matplotlib.pyplot" not in sys.modules  # drawn on Agg canvases, not through pyplot
    images = _pngs(page)
    assert len(images) == len(report._PLOTS) == 4
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 2000 for image in images)
    assert "Not shown" not in page
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained


def test_html_escapes_and_lists_what_has_no_bar(full):
    _, _, page, *_ = full
    assert "<b>LoweringException</b>" not in page
    assert "inductor raised &lt;b&gt;LoweringException&lt;/b&gt;: no kernel for aten.foo &amp; co" in page
    no_bar = page[page.index("No bar for:"):page.index("<h2>Where the step goes")]
    assert "<b>compile</b> (failed): BackendCompilerFailed" in no_bar
    assert "<b>tf32</b> (not applicable): TF32 needs an Ampere" in no_bar
    assert "fp16" not in no_bar  # it ran: it has a bar, its failed check is in the table


def test_html_recommendation_and_tables(full):
    _, _, page, *_ = full
    assert '<div class="rec better">' in page
    assert "<b>Recommended: bf16+channels_last</b> (1.40x)" in page  # the headline: confirmed in turns
    assert "<li><b>fp16</b>: numerically off: gradient error 0.31 &gt; 0.1</li>" in page
    assert ("<p>Timed again in turns with eager: 41.9 -&gt; 29.9 ms/step, 1.40x (p20-p80 of the rounds: "
            "1.35-1.45), 5 rounds of 10 steps. The other contenders in the same rounds: bf16 1.21x.</p>") in page
    assert '<tr class="best"><td class="l">bf16+channels_last ◀</td><td class="l st-ok">ok</td>' in page
    assert "◀ the recommendation" in page
    assert '<td class="l fail" title="float16 over 3 steps' in page and ">FAIL grad 0.31&gt;0.1</td>" in page
    assert ">ok 0.12</td>" in page  # bf16: gradient error 0.012 of a 0.1 tolerance
    assert "2 ranks, spread 12.0 %" in page
    assert "<dt>parameters</dt><dd>11,689,512</dd>" in page and "3.64 TFLOP" in page
    assert '<tr class="best"><td>512</td><td class="l st-ok">ok</td>' in page  # best of the sweep
    assert '<th class="opt">data/fwd/bwd/opt ms</th>' in page and '<p class="narrow">In a window this narrow' in page
    assert "OutOfMemoryError: CUDA out of memory" in page
    assert "The data loader dominates" not in page


def test_html_of_a_minimal_record_has_notes_and_no_plots(tmp_path):
    path = report.render_html(_minimal_record(), tmp_path / "report.html")
    assert path == tmp_path / "report.html" and _names(tmp_path) == ["report.html"]
    page = path.read_text(encoding="utf-8")
    assert _pngs(page) == []
    assert page.count('class="note">Not shown:') == 4
    for note in ("no variant has a measured step time", "no phase split recorded",
                 "no batch-size sweep in this run: not asked for (batch_sizes=None, --batch-sizes none)",
                 "no operator profile in this run", "No variant measured",
                 "No recommendation: the run was interrupted after 0 of 6 variants"):
        assert note in page


def test_html_with_every_variant_failed_draws_only_what_has_data(tmp_path):
    record = _minimal_record()
    record["variants"] = [_variant("eager", "baseline", "failed", error="OutOfMemoryError: CUDA out of memory"),
                          _variant("bf16", "single", "skipped", reason="the baseline failed")]
    record["batch_sweep"] = _full_record()["batch_sweep"]
    page = report.html_report(record)
    assert len(_pngs(page)) == 1  # the batch sweep only
    assert page.count('class="note">Not shown:') == 3
    assert "<b>eager</b> (failed): OutOfMemoryError" in page and "<b>bf16</b> (skipped): the baseline failed" in page


# ---------------------------------------------------------------------------------------------------------
# Terminal.
# ---------------------------------------------------------------------------------------------------------

def test_terminal_wide(full):
    *_, text, _ = full
    lines = text.splitlines()
    assert lines[0] == ("cnnperf profile: ResNet18 on NVIDIA H100 80GB HBM3 (cuda:0), batch 256, 11,689,512 "
                        "parameters, 3.64 TFLOP per step, 2 ranks")
    row = _row(lines, "bf16+channels_last")
    assert row.split()[:5] == ["bf16+channels_last", "◀", "ok", "29.4", "28.8-30.3"]
    assert "1.42x" in row and "ok 0.15" in row and "8,707" in row and "6,330" in row
    assert "0.20/9.70/16.2/2.94" in row  # data/forward/backward/optimizer ms
    fp16 = _row(lines, "fp16")
    assert "FAIL grad 0.31>0.1" in fp16 and "1.37x" in fp16 and "41.1" in fp16  # MFU %
    compile_row = _row(lines, "compile")
    assert compile_row.split()[:3] == ["compile", "failed", "-"] and "12.5" in compile_row  # compile s
    assert "compile: BackendCompilerFailed: inductor raised <b>LoweringException</b>: no kernel for aten.foo & co" \
        in text  # under the table: a column of the width left would cut it short
    assert "tf32: TF32 needs an Ampere or newer GPU; this is a T4." in text
    assert "eager: 2 ranks, spread 12.0 %" in text
    assert "Recommendation: bf16+channels_last (1.40x). bf16 autocast with channels_last" in text
    assert "not fp16: numerically off: gradient error 0.31 > 0.1" in text
    assert ("Timed again in turns with eager: 41.9 -> 29.9 ms/step, 1.40x (p20-p80 of the rounds: 1.35-1.45), "
            "5 rounds of 10 steps. The other contenders in the same rounds: bf16 1.21x.") in " ".join(text.split())
    assert "data loader" not in text
    assert "aten::op_9" in text and "aten::op_10" not in text  # the top 10 ops
    assert any(line.split()[:2] == ["1024", "oom"] and "OutOfMemoryError" in line for line in lines)
    assert any(line.split()[:2] == ["512", "ok"] and "◀ best, largest fitting" in line for line in lines)
    assert "report.html" in text and "trace.json" in text.split("report.html")[-1]  # with its folder, last
    assert "Trace: trace.json" not in text


def test_terminal_very_wide_puts_the_errors_in_a_last_column():
    lines = _terminal(_full_record(), 220).splitlines()
    compile_row = _row(lines, "compile")
    assert "12.5" in compile_row and compile_row.rstrip().endswith(
        "-   BackendCompilerFailed: inductor raised <b>LoweringException</b>: no k…")  # cut at 70
    tf32 = _row(lines, "tf32")
    assert tf32.split()[:2] == ["tf32", "n/a"]
    assert tf32.rstrip().endswith("-   TF32 needs an Ampere or newer GPU; this is a T4.")
    assert max(len(line) for line in lines) <= 220


def test_terminal_at_80_columns_keeps_the_key_columns():
    text = _terminal(_full_record(), 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name, status, ms, speedup in (("eager", "ok", "41.8", "1.00x"), ("channels_last", "ok", "38.0", "1.10x"),
                                      ("bf16", "ok", "31.0", "1.35x"), ("fp16", "ok", "30.5", "1.37x"),
                                      ("compile", "failed", "-", "-"), ("tf32", "n/a", "-", "-")):
        assert _row(lines, name).split()[:4] == [name, status, ms, speedup]  # nothing folded or cut
    assert _row(lines, "bf16+channels_last").split() == ["bf16+channels_last", "◀", "ok", "29.4", "1.42x", "ok",
                                                         "0.15"]
    assert _row(lines, "fp16").split()[-3:] == ["FAIL", "grad", "0.31>0.1"]
    assert "data/fwd/bwd/opt" not in text and "img/s" not in text.split("Batch sweep")[0]  # the folded columns
    compile_note = _row(lines, "compile:")  # the error under the table, cut to the width
    assert compile_note.startswith("  compile: BackendCompilerFailed: inductor raised") and compile_note.endswith("…")
    assert "tf32: TF32 needs an Ampere or newer GPU; this is a T4." in text
    assert _row(lines, "1024").split()[:2] == ["1024", "oom"] and "OutOfMemoryError: CUDA out of" in _row(lines, "1024")


def test_terminal_in_a_log_keeps_every_column_and_cuts_nothing():
    record = _full_record()
    (tf32,) = [v for v in record["variants"] if v["name"] == "tf32"]
    tf32["reason"] = "TF32 needs an Ampere or newer GPU; this is a T4. " * 3  # over NOTE_CHARS
    console = Console(record=True, width=LOG_WIDTH, soft_wrap=True, file=io.StringIO())
    report.render_terminal(record, console)
    text = console.export_text()
    lines = text.splitlines()
    assert "…" not in text
    assert "data/fwd/bwd/opt ms" in text and "img/s" in text and "MFU %" in text  # every column
    assert f"  compile: {COMPILE_ERROR}" in lines  # whole, under the table
    assert any(line.startswith("  tf32: TF32 needs an Ampere") and line.count("this is a T4.") == 3 for line in lines)
    recommendation = [line for line in lines if line.startswith("Recommendation: ")]
    assert len(recommendation) == 1 and recommendation[0].endswith(".")  # one line, not wrapped


def test_terminal_says_when_the_data_loader_dominates():
    record = _keep_eager_record()
    text = _terminal(record, 160)
    assert "The data loader dominates: 62.0 % of the baseline step is spent waiting for data" in text
    assert "Recommendation: eager. Nothing beat eager" in text
    assert "data loader dominates" in _terminal(record, 80).replace("\n", " ")


def test_terminal_of_a_minimal_record():
    text = _terminal(_minimal_record(), 160)
    lines = text.splitlines()
    assert lines[0] == ("cnnperf profile: ResNet18 on NVIDIA H100 80GB HBM3 (cuda:0), batch 256, 11,689,512 "
                        "parameters, interrupted")
    assert "No variant measured" in text and "No recommendation: the run was interrupted after 0 of 6" in text


def test_terminal_with_every_variant_failed():
    record = _minimal_record()
    record["variants"] = [_variant("eager", "baseline", "failed", error="RuntimeError: boom " * 20)]
    record.update(recommendation=None, top_ops=None, batch_sweep={"variant": "eager", "rows": []}, flops=None)
    for width in (160, 80):
        text = _terminal(record, width)
        assert "RuntimeError: boom" in text and "…" in text  # cut, not wrapped over many lines
        assert "No recommendation" in text


# ---------------------------------------------------------------------------------------------------------
# summary_line.
# ---------------------------------------------------------------------------------------------------------

def test_summary_line():
    record = _full_record()
    # The headline is the confirmation's (in turns), with its spread; the search's single pass said 1.42x.
    assert report.summary_line(record) == ("recommended bf16+channels_last: 1.40x faster than eager (41.9 -> 29.9 "
                                           "ms/step; p20-p80 1.35-1.45 over 5 rounds in turns; the search "
                                           "measured 1.42x)")
    record["recommendation"].update(confirmation=None, speedup=41.8 / 29.4, speedup_spread=None,
                                    speedup_source="search")
    assert report.summary_line(record) == ("recommended bf16+channels_last: 1.42x faster than eager "
                                           "(41.8 -> 29.4 ms/step)")
    record["recommendation"].update(variant="eager", speedup=1.0, not_chosen=[],  # the gain did not hold
                                    confirmation={"baseline_ms": 41.8, "variant_ms": 41.5, "speedup": 1.007,
                                                  "rounds": 5, "steps": 10})
    assert report.summary_line(record) == ("keep eager: the fastest variant's gain did not hold when timed again in "
                                           "turns (1.01x)")
    record["recommendation"]["confirmation"].update(speedup=1.06, speedup_p20=1.0, speedup_p80=1.2)
    assert report.summary_line(record) == ("keep eager: the fastest variant was not reliably faster when timed "
                                           "again in turns (1.06x, p20-p80 1.00-1.20)")
    record = _keep_eager_record()
    assert report.summary_line(record) == ("keep eager: no variant was worth switching to (the fastest, bf16, was "
                                           "1.02x); the data loader dominates (62.0 % of the step)")
    record["variants"][2]["check"] = _check("bfloat16", False, 0.5, 0.1)  # fails: not a candidate any more
    record["recommendation"]["data_bound"] = False
    assert report.summary_line(record) == "keep eager: nothing measured beat it (the fastest, channels_last, was 0.97x)"
    assert report.summary_line(_minimal_record()) == ("no recommendation: the run was interrupted after 0 of 6 "
                                                      "variants")


def test_a_sweep_says_its_spread_why_it_stopped_and_when_the_best_is_within_noise():
    record = _full_record()
    sweep = record["batch_sweep"]
    for row in sweep["rows"]:
        if row["status"] == "ok":
            row["images_per_s_p20_p80"] = [0.95 * row["images_per_s"], 1.05 * row["images_per_s"]]
    sweep.update(best_batch_size=512, best_within_noise_of=[256])
    page = report.html_report(record)
    assert "best (within the noise of batch 256)" in page and "images/s [p20-p80]" in page
    text = _terminal(record, width=160)
    assert "best (within the noise of batch 256)" in text
    record["batch_sweep"] = {"variant": "eager", "rows": [], "largest_fitting": None, "best_batch_size": None,
                             "error": "not run: over the time budget of 90 s"}
    assert "No batch-size sweep: not run: over the time budget of 90 s." in _terminal(record, width=160)
    assert "no batch-size sweep in this run: not run: over the time budget of 90 s" in report.html_report(record)
