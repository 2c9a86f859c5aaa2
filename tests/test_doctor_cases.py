"""The doctor on real trainings: the fast cases of bench/doctor_cases.py (issue 15's table, held-out variations and
healthy setups) each get the finding a user should get and no misleading one. The slow cases (60 epochs of a
4.6M-parameter VGG, ResNet-18) run in the benchmark only; their logic is covered on synthetic histories in
test_doctor_findings.py.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "doctor_cases.py"
SPEC = importlib.util.spec_from_file_location("doctor_cases", BENCH)
cases = importlib.util.module_from_spec(SPEC)
sys.modules["doctor_cases"] = cases  # (dataclasses look their module up there)
SPEC.loader.exec_module(cases)

FAST = ["conv12_tanh", "conv10_relu_default_init", "shuffled_labels", "find_lr_sgd_0.001", "softmax_no_watch",
        "mlp10_tanh", "conv10_sigmoid", "softmax_lenet_no_watch", "mlp12_relu_default_init",
        "convnet_adam", "lenet5_adam", "conv10_relu_kaiming_adam", "mlp3_relu_adam"]


@pytest.fixture(scope="module")
def digits():
    return cases.load_data("digits", batch_size=64, image_size=cases.SIDE, seed=0)


@pytest.mark.parametrize("name", FAST)
def test_the_doctor_gets_the_case_right(digits, name):
    (case,) = [c for c in cases.CASES if c.name == name]
    record = cases.train(case, digits)
    timing = {"slow_data_loading"}  # timed: a loaded machine may add a note, which says nothing about the case
    record["findings"] = [f for f in record["findings"] if f["kind"] not in timing or
                          any(e.startswith(f["kind"]) for e in case.expect)]
    assert cases.verdict(case, record) == [], [(f["kind"], f["title"]) for f in record["findings"]]


def test_the_case_list_has_the_issue_table_and_eight_healthy_setups():
    groups = {}
    for c in cases.CASES:
        groups.setdefault(c.group, []).append(c.name)
    assert len(groups["issue"]) == 7 and len(groups["healthy"]) >= 8
    assert set(FAST) <= {c.name for c in cases.CASES}
