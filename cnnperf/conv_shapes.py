"""The convolution layers of torchvision's ResNet-50 and VGG-16, read from the models themselves.

Shared by the benchmarks (what to time) and the audit's performance model (what to predict). The shapes are not
a hand-written table: forward hooks record every ``Conv2d``'s input during one forward pass on the ``meta``
device (no memory, no compute); identical shapes are kept once, under the name of their first layer.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

MODELS = ("resnet50", "vgg16")
FULL_BATCH, FULL_IMAGE = 32, 224


def output_hw(hw, khw, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of a convolution of an (H, W) image ``hw`` with a (KH, KW) filter ``khw``."""
    return tuple((x + 2 * p - d * (k - 1) - 1) // s + 1
                 for x, k, s, p, d in zip(hw, khw, stride, padding, dilation))


def conv_flops(input_shape: Sequence[int], weight_shape: Sequence[int], out_hw: Sequence[int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of the forward convolution, for throughput figures."""
    n = input_shape[0]
    c_out, c_in_g, kh, kw = weight_shape
    return 2 * n * c_out * out_hw[0] * out_hw[1] * c_in_g * kh * kw


@dataclass(frozen=True)
class ConvShape:
    """One convolution layer: input (n, c_in, h, w), weight (c_out, c_in / groups, kh, kw) and its arguments.

    ``layers`` counts the layers of the model that have exactly this shape (the row stands for all of them).
    """

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    layers: int = 1

    @property
    def model(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_in, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in // self.groups, self.kh, self.kw)

    @property
    def output_hw(self) -> tuple[int, int]:
        return output_hw((self.h, self.w), (self.kh, self.kw), self.stride, self.padding, self.dilation)

    def key(self) -> tuple:
        """Everything but the name and count: two layers with equal keys are the same benchmark."""
        return dataclasses.astuple(self)[1:-1]

    def flops(self, pass_: str) -> int:
        """FLOPs of one call: the forward convolution, or 3x that for forward + backward (dgrad + wgrad)."""
        fwd = conv_flops(self.input_shape, self.weight_shape, self.output_hw)
        return fwd if pass_ == "fwd" else 3 * fwd

    def fields(self) -> dict:
        """The shape as flat JSON fields."""
        d = dataclasses.asdict(self)
        d.update(model=self.model, stride=list(self.stride), padding=list(self.padding),
                 dilation=list(self.dilation), out_h=self.output_hw[0], out_w=self.output_hw[1])
        return d


def meta_model(model: str) -> torch.nn.Module:
    """torchvision's ``model`` on the ``meta`` device: its shapes, no memory."""
    import torchvision  # only needed here; keeps `import cnnperf.benchmarks.conv` light

    with torch.device("meta"):  # no weights are allocated or initialised
        return getattr(torchvision.models, model)(weights=None)


@functools.lru_cache(maxsize=None)
def model_conv_layers(model: str, batch: int, image_size: int) -> tuple[ConvShape, ...]:
    """Every Conv2d of ``model`` (torchvision layout) in call order, with the input shape it sees.

    Forward hooks record each layer's input during one forward pass on the ``meta`` device. ResNet-50 is
    torchvision's v1.5 layout (the stride sits on the 3x3 convolution of a bottleneck).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    net = meta_model(model).eval()
    found: list[ConvShape] = []

    def record(name, module, args, _output):
        if isinstance(module.padding, str):
            raise ValueError(f"{model}.{name}: padding={module.padding!r} is not supported by the harness")
        n, c_in, h, w = args[0].shape
        c_out, _, kh, kw = module.weight.shape
        found.append(ConvShape(f"{model}.{name}", n, c_in, h, w, c_out, kh, kw, tuple(module.stride),
                               tuple(module.padding), tuple(module.dilation), module.groups))

    hooks = [m.register_forward_hook(functools.partial(record, name))
             for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            net(torch.empty(batch, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return tuple(found)


def unique_shapes(layers: Sequence[ConvShape]) -> list[ConvShape]:
    """``layers`` with identical shapes kept once (first name, in order), ``layers`` counting the duplicates."""
    first: dict[tuple, ConvShape] = {}
    for s in layers:
        kept = first.get(s.key())
        first[s.key()] = s if kept is None else dataclasses.replace(kept, layers=kept.layers + 1)
    return list(first.values())


def conv_shapes(model: str, batch: int = FULL_BATCH, image_size: int = FULL_IMAGE) -> list[ConvShape]:
    """The benchmark rows of ``model``: its distinct convolution shapes at batch 32 on 224x224 images.

    At another ``batch`` or ``image_size`` (``--quick``: 2 and 56) the rows are the same layers, measured at
    that size: layers that only coincide at the smaller size are not merged, so that a quick run and a full
    run list the same names.
    """
    full = unique_shapes(model_conv_layers(model, FULL_BATCH, FULL_IMAGE))
    if (batch, image_size) == (FULL_BATCH, FULL_IMAGE):
        return full
    resized = {s.name: s for s in model_conv_layers(model, batch, image_size)}
    return [dataclasses.replace(resized[s.name], layers=s.layers) for s in full]
