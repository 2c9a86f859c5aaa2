"""The training doctor: trains a CNN, watches it, and explains with evidence what is wrong and what to change.

- :class:`Doctor` (:mod:`cnnperf.doctor.monitor`): a few calls in any training loop record gradients,
  activations, inputs, losses and timings, cheaply (no host synchronisation inside a step).
- :func:`diagnose` and the detectors (:mod:`cnnperf.doctor.findings`): pure functions from a recorded history
  to :class:`Finding` objects with evidence and ordered advice.
- :func:`fit`, :func:`lr_range_test` (:mod:`cnnperf.doctor.train`): the loop and the LR range test that
  ``cnnperf doctor`` (:mod:`cnnperf.doctor.cli`) uses.
"""

from cnnperf.doctor.findings import KINDS, SEVERITIES, Finding, diagnose, early_stopping
from cnnperf.doctor.monitor import Doctor, Report
from cnnperf.doctor.train import classification_metrics, fit, lr_range_test

__all__ = ["Doctor", "Report", "Finding", "KINDS", "SEVERITIES", "diagnose", "early_stopping", "fit",
           "lr_range_test", "classification_metrics"]
