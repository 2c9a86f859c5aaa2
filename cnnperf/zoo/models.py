"""The model zoo: classic CNNs sized for the small images of :mod:`cnnperf.zoo.data` (doctor and profiler).

``build_model(name, in_channels=..., num_classes=..., image_size=...)`` returns a freshly initialised model
(seed torch first for the same weights) whose output is logits ``(N, num_classes)``: no softmax at the end,
since ``nn.CrossEntropyLoss`` applies log-softmax itself (a softmax before it is a classic bug the doctor looks
for, and these models must not have it).

- ``convnet`` (225,034 parameters at 1x28x28, 10 classes): the MNIST tutorial ConvNet, conv 3x3 32, ReLU,
  max-pool 2, conv 3x3 64, ReLU, max-pool 2, linear 128, ReLU, dropout, linear.
- ``lenet5`` (61,706): LeNet-5 with ReLU and max pooling, conv 5x5 6 (padding 2, so 28x28 maps as the original
  32x32 did), conv 5x5 16, linear 120, 84.
- ``alexnet_small`` (about 1.5M): AlexNet's five convolutions (5x5, 5x5, then 3x3 three times; 32, 96, 192, 128,
  128 channels; max-pool after the 1st, 2nd and 5th), an adaptive average pool to 3x3, linear 512, 512 with
  dropout before each, as torchvision's AlexNet.
- ``vgg11_small`` (about 0.9M): VGG-11 with BatchNorm at a quarter of the channels (16 ... 128), max-pools with
  ``ceil_mode`` so that 28 px survives all five, an adaptive average pool to 1x1, linear 512, 512.
- ``resnet18`` (about 11.2M): ``torchvision.models.resnet18(weights=None)`` with ``in_channels``; for
  ``image_size <= 64`` the CIFAR stem, one 3x3 stride-1 convolution and no max-pool.
- ``resnet50`` (about 23.5M): ``torchvision.models.resnet50(weights=None)``, with the same stem rule; the
  profiler's larger benchmark model.

Dropout: ``dropout=0.0`` by default in every model, where torchvision's AlexNet and VGG use 0.5. The doctor has
to be able to *see* overfitting (the gap between training and validation loss) before it can advise dropout;
pass ``dropout=0.5`` for the regularised models. At 0 the dropout layers are ``nn.Identity`` placeholders, so a
model "has dropout" exactly when it drops something, and the parameter names do not depend on it (except in
the ResNets, whose ``fc`` stays torchvision's ``Linear`` at 0).

Every ReLU is its own ``nn.ReLU`` module, not in place, so forward and backward hooks (the dead-ReLU monitor) can
read each one; torchvision's ResNet calls one ReLU module twice per block, which a hook sees as two calls.

Sizes that are computed, never hard-coded: the input of the first linear layer follows from ``image_size``; a
size too small for a model's poolings raises :class:`ModelError` naming the smallest that works.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

MODELS = ("convnet", "lenet5", "alexnet_small", "vgg11_small", "resnet18", "resnet50")

VGG11_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # torchvision's "A" layout
VGG_CHANNEL_DIVISOR = 4
SMALL_IMAGE = 64  # the ResNets take the CIFAR stem up to this image size


class ModelError(ValueError):
    """A model that cannot be built as asked: an unknown name or a bad size. One sentence, for the user."""


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int,
                dropout: float = 0.0) -> nn.Module:
    """A new model ``name`` (one of :data:`MODELS`) for float32 images ``(N, in_channels, image_size,
    image_size)``, returning logits ``(N, num_classes)``.

    ``dropout``: the probability of the dropout layers in the classifier (see the module docstring; default 0).
    Raises :class:`ModelError` for an unknown name, a non-positive size, or an image too small for the model.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{arg} must be a positive integer, got {value!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
    builders = {"convnet": ConvNet, "lenet5": LeNet5, "alexnet_small": AlexNetSmall, "vgg11_small": VGG11Small,
                "resnet18": functools.partial(_resnet, "resnet18"),
                "resnet50": functools.partial(_resnet, "resnet50")}
    return builders[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                          dropout=float(dropout))


class ConvNet(nn.Module):
    """The MNIST tutorial ConvNet, written correctly: two unpadded 3x3 convolutions with ReLU and 2x2 max-pooling,
    a 128-unit hidden layer, logits. 28x28 -> 26 -> 13 -> 11 -> 5: the first linear layer takes 64 * 5 * 5."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0):
        super().__init__()
        side = _side("convnet", image_size, [("conv", 3, 0), ("pool", 2), ("conv", 3, 0), ("pool", 2)])
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 128), nn.ReLU(), _dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) as it is trained today: ReLU instead of tanh, max- instead of average
    pooling, a full connection between C3 and S2. The first convolution pads by 2, so 28x28 -> 28 -> 14 -> 10
    -> 5 as the original 32x32 input did, and the first linear layer takes 16 * 5 * 5 (16 * 6 * 6 at 32x32)."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0):
        super().__init__()
        side = _side("lenet5", image_size, [("conv", 5, 2), ("pool", 2), ("conv", 5, 0), ("pool", 2)])
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), _dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNetSmall(nn.Module):
    """AlexNet's layout (five convolutions, max-pool after the 1st, 2nd and 5th, three linear layers with
    dropout before the first two, as torchvision's) for 28-64 px: 5x5/5x5/3x3 kernels at stride 1 with
    'same' padding instead of 11x11 at stride 4, channels halved, an adaptive average pool to 3x3 (torchvision:
    6x6) and 512-unit hidden layers instead of 4096. 28 px: 28 -> 14 -> 7 -> 3."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0):
        super().__init__()
        _side("alexnet_small", image_size, [("pool", 2)] * 3)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 96, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(96, 192, 3, padding=1), nn.ReLU(),
            nn.Conv2d(192, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(3)
        self.classifier = nn.Sequential(
            _dropout(dropout), nn.Linear(128 * 3 * 3, 512), nn.ReLU(),
            _dropout(dropout), nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG11Small(nn.Module):
    """VGG-11 with BatchNorm (torchvision's ``vgg11_bn`` layout) at a quarter of the channels (16 ... 128).
    Its five 2x2 max-pools round up (``ceil_mode``), so 28 px goes 28 -> 14 -> 7 -> 4 -> 2 -> 1 instead of
    vanishing; an adaptive average pool to 1x1 (torchvision: 7x7) feeds 512-unit hidden layers (torchvision:
    4096) with dropout after each, as torchvision's."""

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG11_CHANNELS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = item // VGG_CHANNEL_DIVISOR
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512), nn.ReLU(), _dropout(dropout),
            nn.Linear(512, 512), nn.ReLU(), _dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _resnet(arch: str, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet ``arch`` (resnet18, resnet50), untrained. Up to 64 px the ImageNet stem (7x7
    stride 2, then a stride-2 max-pool: 28 px would be 7 px before the first block) becomes one 3x3 stride-1
    convolution with no max-pool, as for CIFAR; above, the ImageNet stem is kept (with ``in_channels``).
    ``dropout > 0`` puts a dropout layer before the final linear layer (``fc`` becomes
    ``Sequential(Dropout, Linear)``)."""
    import torchvision.models

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits it
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if dropout > 0:
        model.fc = nn.Sequential(_dropout(dropout), model.fc)
    return model


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or for ``p == 0`` an ``nn.Identity`` in its place: the layer indices (and so the
    parameter names) stay the same, and a model without dropout has no dropout module for the doctor to find."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _side(name: str, image_size: int, layers: list[tuple]) -> int:
    """The side of the feature map after ``layers`` (``("conv", kernel, padding)`` at stride 1, ``("pool", k)``
    at stride k, rounding down); a :class:`ModelError` naming the smallest image size that works if it is < 1."""

    def side(size: int) -> int:
        for layer in layers:
            size = size - layer[1] + 1 + 2 * layer[2] if layer[0] == "conv" else size // layer[1]
            if size < 1:
                return 0
        return size

    if side(image_size) < 1:
        smallest = next(s for s in range(image_size + 1, 1 << 16) if side(s) >= 1)
        raise ModelError(f"{name} needs images of at least {smallest}x{smallest} pixels, "
                         f"got {image_size}x{image_size}.")
    return side(image_size)
