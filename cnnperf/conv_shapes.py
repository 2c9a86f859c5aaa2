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

from cnnperf.perf_model import Conv

MODELS = ("resnet50", "vgg16")
FULL_BATCH, FULL_IMAGE = 32, 224


@dataclass(frozen=True)
class ConvShape(Conv):
    """One convolution layer of a model: the problem (input (n, c_in, h, w), weight (c_out, c_in / groups, kh,
    kw) and its arguments; :class:`cnnperf.perf_model.Conv`), its ``name``, and in ``layers`` how many layers
    of the model have exactly this shape (the row stands for all of them)."""

    name: str = ""
    layers: int = 1

    @property
    def model(self) -> str:
        return self.name.split(".", 1)[0]

    def key(self) -> tuple:
        """The problem without the name and count: two layers with equal keys are the same benchmark."""
        return dataclasses.astuple(Conv.of(self))

    def flops(self, pass_: str) -> int:
        """FLOPs of one call: the forward convolution, or 3x that for forward + backward (dgrad + wgrad)."""
        return self.macs * 2 if pass_ == "fwd" else 6 * self.macs

    def fields(self) -> dict:
        """The shape as flat JSON fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("itemsize", "has_bias")}
        d.update(model=self.model, stride=list(self.stride), padding=list(self.padding),
                 dilation=list(self.dilation), out_h=self.oh, out_w=self.ow)
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
        found.append(ConvShape(n, c_in, h, w, c_out, kh, kw, tuple(module.stride), tuple(module.padding),
                               tuple(module.dilation), module.groups, name=f"{model}.{name}"))

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
