"""The Triton path of FusedConv2dBatchNormReLU (the conv kernel's statistics epilogue, the BatchNorm + ReLU
passes, the GEMMs on dz) against float64 eager Conv2d + BatchNorm2d + ReLU: outputs, all gradients, running
statistics and counters over several steps, then eval. Through Triton's interpreter without a GPU (small
shapes; fp32 and fp16: the interpreter's bf16 tl.dot is wrong, see tests/test_conv_bias_relu_triton.py)."""

import pytest
import torch
from conv_bn_eager import compare_training, randomize

from cnnperf import backend
from cnnperf.nn import FusedConv2dBatchNormReLU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not backend.device_runs_triton(DEVICE) or backend.interpreter_problem() is not None
                                 and DEVICE == "cpu",
                                 reason="Triton cannot run here (no GPU and no working TRITON_INTERPRET)")]


@pytest.mark.parametrize("kwargs, shape", [
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (3, 3, 7, 6)),  # partial tiles everywhere
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=True), (2, 4, 9, 7)),
    (dict(in_channels=8, out_channels=16, kernel_size=1, momentum=None), (2, 8, 5, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, affine=False, track_running_stats=False), (2, 3, 6, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=2), (1, 2, 3, 2)),  # two values per channel
], ids=["3x3", "strided-groups-bias", "1x1-momentum-none", "bare", "batch1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trains_as_conv_batchnorm_relu(kwargs, shape, dtype):
    layer = randomize(FusedConv2dBatchNormReLU(**kwargs, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer.to(dtype) if dtype != torch.float32 else layer, shape, steps=2, dtype=dtype,
                         channels_last=True)


def test_tiles_combine_to_exact_statistics_far_from_zero():
    """Many row tiles of very different means (offset 30): Chan's combination against float64."""
    layer = randomize(FusedConv2dBatchNormReLU(2, 3, 1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer, (4, 2, 9, 9), steps=1, offset=30.0, eval_step=False)


def test_nchw_grad_output_and_input():
    layer = randomize(FusedConv2dBatchNormReLU(3, 4, 3, padding=1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer, (2, 3, 5, 5), steps=1, eval_step=False)
