"""The doctor's report renderers (cnnperf.doctor.report) on synthetic doctor.json records: strict JSON written
atomically, the HTML report (escaping, embedded plots, notes for what is missing) and the terminal summary.

One full report is drawn once per module (drawing the six plots takes a few seconds on a small CPU); the other
records have at most one plot.
"""

import base64
import io
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from cnnperf._terminal import LOG_WIDTH
from cnnperf.doctor import report

NAN = math.nan
PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SCRIPT_TITLE = "Overfitting <script>alert(1)</script> after epoch 2"
ERROR_EVIDENCE = "Gradient norm of features.0.weight was NaN at step 40 (loss 2.31 -> nan); see [bold]x[/bold] & co"
LAYERS = ["features.0.weight", "features.3.weight", "features.6.weight", "classifier.0.weight",
          "classifier.2.weight"]
RELUS = ["features.1", "features.4", "classifier.1"]


def _run(**changes) -> dict:
    run = {"model": "smallcnn", "data": "digits", "device": "cpu", "epochs": 6, "epochs_done": 4,
           "batch_size": 64, "lr": np.float32(0.1), "optimizer": "sgd", "clip": None, "augment": False, "seed": 0,
           "started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T00:01:01+00:00", "interrupted": False,
           "seconds": 61.5, "parameters": 12345, "train_size": 1437, "val_size": 360,
           "versions": {"torch": torch.__version__, "cnnperf": "0.1.0"}}
    run.update(changes)
    return run


def _finding(kind: str, severity: str, title: str, evidence: str = "", advice=("Do this.", "Then that.")) -> dict:
    return {"kind": kind, "severity": severity, "title": title, "evidence": evidence or f"{title}: the numbers.",
            "advice": list(advice), "data": {}}


def _full_record() -> dict:
    """Four epochs (NaN train loss and null val metrics in the last), 12 sampled steps over 5 layers and 3 ReLUs
    (a NaN and a zero gradient norm among them), findings of all three severities (listed out of order), 3
    classes, an LR range test ending in NaN; numpy and torch scalars and tuples where an engine might put them."""
    steps = list(range(0, 120, 10))
    grad_norm = [[10.0 ** (-k + s / 100) for k in range(5)] for s in steps]
    grad_norm[4][0], grad_norm[5][2] = NAN, 0.0
    return {
        "schema": report.SCHEMA,
        "run": _run(),
        "findings": [
            _finding("lr_too_low", "info", "The learning rate could be higher",
                     "The LR range test suggests 3e-3, 30x the 1e-4 used."),
            _finding("overfitting", "warning", SCRIPT_TITLE, "Train accuracy 95.0 % vs validation 85.0 % <b>gap</b>.",
                     advice=("Turn on augmentation (--augment).", "Add weight decay 5e-4.", "Stop at epoch 3.")),
            {**_finding("nonfinite_gradients", "error", "Non-finite gradients", ERROR_EVIDENCE),
             "data": {"step": 40, "grad_norm": NAN, "loss": torch.tensor(2.31), "layers": ("features.0.weight",)}},
        ],
        "history": {
            "epochs": [{"epoch": i + 1, "train_loss": [1.2, 0.6, 0.3, NAN][i], "train_acc": [0.6, 0.8, 0.9, 0.95][i],
                        "val_loss": [1.1, 0.7, 0.5, None][i], "val_acc": [0.62, 0.78, 0.85, None][i],
                        "lr": 0.1, "seconds": np.float64(15.2)} for i in range(4)],
            "steps": {"step": steps, "epoch": [1 + s // 30 for s in steps], "loss": [2.3 - s / 100 for s in steps],
                      "lr": [0.1] * 12, "data_time": [0.01] * 12, "step_time": [0.1] * 12},
            "layers": {"names": LAYERS, "steps": steps, "grad_norm": grad_norm,
                       "grad_to_weight": [[1e-3] * 5 for _ in steps],
                       "update_to_weight": [tuple(1e-3 * 10.0 ** (k - 2) for k in range(5)) for _ in steps]},
            "relu": {"names": RELUS, "steps": steps, "dead_fraction": [[0.1, 0.5, float("inf")] for _ in steps]},
        },
        "metrics": {"accuracy": 0.85, "precision_macro": 0.84, "recall_macro": 0.83, "f1_macro": 0.835,
                    "confusion_matrix": np.array([[50, 2, 1], [3, 40, 7], [0, 5, 60]]).tolist(),
                    "classes": ["zero", "one", "two"]},
        "best_epoch": 3,
        "early_stop_epoch": 4,
        "lr_finder": {"lrs": [1e-5 * 1.2 ** i for i in range(60)],
                      "losses": [2.3 - 0.02 * i if i < 45 else 2.3 + (i - 45) ** 2 for i in range(59)] + [NAN],
                      "suggested_lr": 1e-3},
    }


def _empty_record() -> dict:
    """Ctrl-C during the first epoch: nothing recorded but the run."""
    return {"schema": report.SCHEMA, "run": _run(epochs_done=0, interrupted=True, seconds=3.2), "findings": [],
            "history": {"epochs": [], "steps": {"step": [], "epoch": [], "loss": [], "lr": [], "data_time": [],
                                                "step_time": []},
                        "layers": {"names": [], "steps": [], "grad_norm": [], "grad_to_weight": [],
                                   "update_to_weight": []},
                        "relu": {"names": [], "steps": [], "dead_fraction": []}},
            "metrics": None, "best_epoch": None, "early_stop_epoch": None, "lr_finder": None}


def _terminal(record) -> str:
    console = Console(record=True, width=120)
    report.render_terminal(record, console)
    return console.export_text()


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in PNG.findall(page)]


def _strict_json(text: str):
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full record written by write_reports once: (record, paths, html text, terminal text, pyplot before)."""
    pyplot_before = "matplotlib.pyplot" in sys.modules
    out = tmp_path_factory.mktemp("doctor") / "new" / "folder"  # not there yet: write_reports creates it
    console = Console(record=True, width=120)
    record = _full_record()
    paths = report.write_reports(record, out, console=console)
    return record, paths, paths["html"].read_text(encoding="utf-8"), console.export_text(), pyplot_before


# ---------------------------------------------------------------------------------------------------------
# doctor.json
# ---------------------------------------------------------------------------------------------------------

def test_jsonable_replaces_nonfinite_and_converts_containers_and_scalars():
    obj = {"a": (1.0, NAN, float("inf"), -float("inf")), "b": [np.float32("nan"), np.float64(0.5), np.int64(3)],
           "c": torch.tensor(0.25), "d": np.array([[1.0, np.nan]]), "e": {"f": None, "g": True, "h": "x"}}
    assert report.jsonable(obj) == {"a": [1.0, None, None, None], "b": [None, 0.5, 3], "c": 0.25,
                                    "d": [[1.0, None]], "e": {"f": None, "g": True, "h": "x"}}
    assert type(report.jsonable(np.int64(3))) is int and report.jsonable(True) is True
    json.dumps(report.jsonable(obj), allow_nan=False)


def test_doctor_json_is_strict_and_round_trips(full):
    record, paths, *_ = full
    loaded = _strict_json(paths["json"].read_text())  # fails on a NaN or Infinity token
    assert loaded == report.jsonable(record)
    assert loaded["schema"] == "cnnperf.doctor/1"
    assert loaded["history"]["epochs"][3]["train_loss"] is None  # NaN
    assert loaded["history"]["layers"]["grad_norm"][4][0] is None
    assert loaded["history"]["layers"]["grad_norm"][5][2] == 0.0
    assert loaded["history"]["relu"]["dead_fraction"][0] == [0.1, 0.5, None]  # inf
    assert loaded["history"]["layers"]["update_to_weight"][0] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert loaded["findings"][2]["data"] == {"step": 40, "grad_norm": None, "loss": pytest.approx(2.31),
                                             "layers": ["features.0.weight"]}
    assert loaded["run"]["lr"] == pytest.approx(0.1) and loaded["lr_finder"]["losses"][-1] is None


def test_reports_leave_exactly_two_files(full):
    _, paths, *_ = full
    assert set(paths) == {"json", "html"}
    assert sorted(os.listdir(paths["json"].parent)) == ["doctor.json", "report.html"]  # no temporary file left
    assert paths["json"].name == "doctor.json" and paths["html"].parent == paths["json"].parent


def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "doctor.json"
    report.write_json_atomic(path, {"schema": report.SCHEMA, "x": [NAN]})
    assert _strict_json(path.read_text()) == {"schema": report.SCHEMA, "x": [None]}
    with pytest.raises(TypeError):
        report.write_json_atomic(path, {"x": object()})
    assert _strict_json(path.read_text()) == {"schema": report.SCHEMA, "x": [None]}
    assert os.listdir(tmp_path) == ["doctor.json"]


def test_records_are_checked_at_the_entry(tmp_path):
    with pytest.raises(TypeError, match="doctor.json dict"):
        report.render_terminal([1, 2], Console(record=True))
    with pytest.raises(ValueError, match="cnnperf.doctor/2"):
        report.render_html({"schema": "cnnperf.doctor/2"}, tmp_path / "r.html")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------------------------------------

def test_html_escapes_the_findings_and_lists_them_by_severity(full):
    record, _, page, *_ = full
    assert "<script" not in page.lower()
    assert "Overfitting &lt;script&gt;alert(1)&lt;/script&gt; after epoch 2" in page
    assert "Train accuracy 95.0 % vs validation 85.0 % &lt;b&gt;gap&lt;/b&gt;." in page
    assert "features.0.weight was NaN at step 40 (loss 2.31 -&gt; nan); see [bold]x[/bold] &amp; co" in page
    for advice in ("Turn on augmentation (--augment).", "Add weight decay 5e-4.", "Stop at epoch 3."):
        assert f"<li>{advice}</li>" in page  # the whole list, not only the first
    error, warning, info = (page.index(t) for t in ("Non-finite gradients", "Overfitting &lt;script",
                                                      "The learning rate could be higher"))
    assert error < warning < info
    assert "No problems found" not in page


def test_html_embeds_one_png_per_plot(full):
    _, _, page, *_ = full
    images = _pngs(page)
    assert len(images) == len(report._PLOTS) == 6
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 2000 for image in images)
    assert "Not shown" not in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained
    assert re.search(r'<tr class="best"><td>3</td>', page)
    assert "accuracy <b>85.0 %</b>, macro precision <b>84.0 %</b>, macro recall <b>83.0 %</b>, macro F1 <b>83.5 %</b>" \
        in page
    assert "<dt>parameters</dt><dd>12,345</dd>" in page and "1 error and 1 warning" in page


def test_rendering_leaves_pyplot_alone(full):
    *_, pyplot_before = full
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules


def test_html_of_an_interrupted_first_epoch_has_notes_and_no_plots(tmp_path):
    record = _empty_record()
    path = report.render_html(record, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.html" and os.listdir(tmp_path) == ["report.html"]
    assert not _pngs(page)
    assert page.count('class="note">Not shown:') == 6
    for note in ("no epoch finished", "no per-layer gradient norms recorded", "no dead-ReLU fractions recorded",
                 "no confusion matrix", "no LR range test"):
        assert note in page
    assert "interrupted" in page and "No validation metrics" in page and "No findings" in page
    assert "No problems found" in page


def test_html_draws_only_the_plots_whose_data_is_there(tmp_path):
    record = _empty_record()
    record["lr_finder"] = _full_record()["lr_finder"]
    record["history"]["layers"] = {"names": LAYERS, "steps": [0, 10],  # a row too short: noted, not drawn
                                   "grad_norm": [[1.0] * 5, [1.0] * 4], "update_to_weight": [[1e-3] * 5] * 2}
    page = report.render_html(record, tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(_pngs(page)) == 2  # the update-to-weight ratios and the LR range test
    assert "per-layer gradient norms is malformed: a row of 4 values for 5 names" in page
    assert "suggested" in page and page.count('class="note">Not shown:') == 4


def test_html_of_a_bare_record(tmp_path):
    page = report.render_html({}, tmp_path / "report.html").read_text(encoding="utf-8")
    assert not _pngs(page) and page.count('class="note">Not shown:') == 6


# ---------------------------------------------------------------------------------------------------------
# Terminal.
# ---------------------------------------------------------------------------------------------------------

def test_terminal_summary(full):
    *_, text, _ = full
    lines = text.splitlines()
    assert lines[0].startswith("cnnperf doctor: smallcnn on digits, cpu: 4/6 epochs in 1 min 01 s")
    assert "interrupted" not in lines[0]
    best = [line for line in lines if "best" in line]
    assert len(best) == 1 and best[0].split()[:2] == ["3", "0.3"]
    assert any(line.split()[:2] == ["4", "nan"] and "early stop" in line for line in lines)
    assert text.index("Non-finite gradients") < text.index("Overfitting") < text.index("The learning rate")
    assert "    1. Turn on augmentation" in text and "    2. Add weight decay 5e-4." in text  # every advice, numbered
    assert "accuracy 85.0 %, macro precision 84.0 %, recall 83.0 %, F1 83.5 %" in text
    assert any(line.split() == ["1", "one", "3", "40", "7"] for line in lines)  # confusion matrix row
    assert "No problems found" not in text
    assert "Verdict: 1 error and 1 warning" in text
    assert "report.html" in text  # write_reports says where the files are


def test_terminal_prints_finding_text_as_is():
    record = _empty_record()
    record["findings"] = [_finding("overfitting", "warning", "<script>x</script>", "see [bold]x[/bold]",
                                   advice=["[red]no[/red]"])]
    text = _terminal(record)
    assert "<script>x</script>" in text and "see [bold]x[/bold]" in text and "[red]no[/red]" in text


@pytest.mark.parametrize("severities, problems", [((), False), (("info",), False), (("info", "warning"), True),
                                                   (("error",), True)])
def test_terminal_verdict(severities, problems):
    record = _empty_record()
    record["findings"] = [_finding("dead_relu", s, f"A {s} finding") for s in severities]
    text = _terminal(record)
    assert ("No problems found" in text) is not problems
    for s in severities:
        assert f"A {s} finding" in text


def test_terminal_of_an_interrupted_first_epoch():
    text = _terminal(_empty_record())
    assert text.splitlines()[0] == "cnnperf doctor: smallcnn on digits, cpu: 0/6 epochs in 3.2 s, interrupted"
    for line in ("No epoch finished", "No findings", "No validation metrics",
                 "No problems found (the run was interrupted after 0 epochs"):
        assert line in text


CLIP_ADVICE = ("Clip the gradient norm: cnnperf.clip_grad_norm_(model.parameters(), max_norm=1.0) after "
               "backward, or --clip 1.0 on the command line.")


def _render(record, console) -> str:
    report.render_terminal(record, console)
    return console.export_text()


def test_terminal_at_80_columns_fits_and_cuts_no_word():
    record = _full_record()
    record["findings"].append(_finding("exploding_gradients", "warning", "Exploding gradients",
                                       "The total gradient norm reached 1.2e4 at step 31, 480x its median.",
                                       advice=(CLIP_ADVICE,)))
    text = _render(record, Console(record=True, width=80, force_terminal=True, file=io.StringIO()))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert _row(lines, "epoch").split() == ["epoch", "train", "loss", "train", "acc", "val", "loss", "val", "acc",
                                            "lr", "time", "note"]  # whole headers
    assert _row(lines, "3").split()[-2:] == ["◀", "best"] and _row(lines, "4").split()[-2:] == ["early", "stop"]
    words = " ".join(text.split())  # the findings wrap at spaces only: every word is whole
    assert "1. Clip the gradient norm: cnnperf.clip_grad_norm_(model.parameters()," in words
    assert "Train accuracy 95.0 % vs validation 85.0 % <b>gap</b>." in words
    assert "1. Turn on augmentation (--augment). 2. Add weight decay 5e-4. 3. Stop at epoch 3." in words
    assert any(line.split() == ["1", "one", "3", "40", "7"] for line in lines)


def test_terminal_in_a_log_is_plain_lines():
    record = _full_record()
    record["findings"].append(_finding("exploding_gradients", "warning", "Exploding gradients", advice=(CLIP_ADVICE,)))
    text = _render(record, Console(record=True, width=LOG_WIDTH, soft_wrap=True, file=io.StringIO()))
    lines = [line.rstrip() for line in text.splitlines()]
    assert "    1. " + CLIP_ADVICE in lines and "    " + ERROR_EVIDENCE in lines  # one line each, whole
    assert "…" not in text and max(len(line) for line in lines) < 200


def test_a_confusion_matrix_wider_than_the_terminal_is_left_to_the_report():
    record = _empty_record()
    record["metrics"] = {"accuracy": 0.5, "precision_macro": 0.5, "recall_macro": 0.5, "f1_macro": 0.5,
                         "confusion_matrix": [[1000] * 18 for _ in range(18)], "classes": [str(i) for i in range(18)]}
    narrow = _render(record, Console(record=True, width=80, force_terminal=True, file=io.StringIO()))
    assert "18 classes, too many for the terminal; see report.html" in narrow
    assert "Confusion matrix (rows" in _render(record, Console(record=True, width=160, file=io.StringIO()))


def _row(lines: list[str], first: str) -> str:
    (line,) = [line for line in lines if line.split()[:1] == [first]]
    return line


def test_terminal_with_null_metric_values_and_many_classes():
    record = _empty_record()
    record["metrics"] = {"accuracy": None, "precision_macro": NAN, "recall_macro": None, "f1_macro": None,
                         "confusion_matrix": [[1] * 25 for _ in range(25)], "classes": [str(i) for i in range(25)]}
    text = _terminal(record)
    assert "accuracy -, macro precision nan, recall -, F1 -" in text
    assert "25 classes, too many for the terminal" in text
