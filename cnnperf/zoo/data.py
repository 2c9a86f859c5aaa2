"""The data sets of the doctor and the profiler: real images by default, with a held-out validation split, as
DataLoaders.

``load_data(name)`` returns a :class:`DataBundle`: a shuffled training loader, an unshuffled validation loader and
what a model and a report need to know about the data (classes, channels, image size, normalisation).

- ``digits`` (the default): scikit-learn's ``load_digits()``, 1,797 real 8x8 handwritten digits (values
  0..16) bundled with scikit-learn, so no download; scaled to [0, 1] and resized once to 28x28 (bilinear), kept
  as tensors. Validation: a stratified split of ``val_fraction``, seeded. Normalised with the training split's
  mean and std. Augmentation: rotation up to +-10 degrees and a shift up to 10% of the side.
- ``mnist``: ``torchvision.datasets.MNIST`` under ``root``; validation is the official test split; mean 0.1307,
  std 0.3081; the same augmentation as digits.
- ``cifar10``: ``torchvision.datasets.CIFAR10`` under ``root``; validation is the official test split; the
  per-channel mean and std of its training images; augmentation: random crop 32 with padding 4, horizontal flip.
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` at ``root/train`` and ``root/val`` (one folder per class
  in each); without ``val/``, a stratified seeded split of ``root/train`` or of ``root``. RGB, resized to
  ``image_size`` (default 64: shorter side, then a centre crop), ImageNet's mean and std; augmentation: random
  resized crop, horizontal flip.
- ``fake``: random normal 3x32x32 tensors with random labels, 10 classes, 640 in all (512 / 128 at the default
  ``val_fraction``), already mean 0 and std 1; for speed only, never augmented.

Augmentation applies to the training split only.

Nothing is downloaded unless ``download=True``; MNIST and CIFAR-10 are read from ``root`` (default
:data:`DEFAULT_ROOT`). Everything that can go wrong with the arguments or the files raises :class:`DataError`
(a ``ValueError``) with one sentence that names the argument or the directory; the command line turns it into
exit status 2.

Determinism: the split and the training loader's shuffling come from ``seed`` alone (the loader has its own
generator). The random augmentations draw from torch's global generator (seed it with ``torch.manual_seed``),
or, with ``num_workers > 0``, from the per-worker generators that the loader seeds from its own generator.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

DATASETS = ("digits", "mnist", "cifar10", "imagefolder", "fake")

# Where MNIST and CIFAR-10 are looked for (and downloaded to, with download=True) when no root is given.
DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cnnperf" / "data"

DIGITS_SIZE = 28  # the 8x8 digits are resized to MNIST's size, so the same models and settings fit both
DIGITS_MAX = 16.0  # load_digits() pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# The mean and the per-pixel std of CIFAR-10's 50,000 training images. (The (0.2023, 0.1994, 0.2010) seen in
# many scripts is the mean over images of each image's own std, not the std of the pixels.)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGEFOLDER_SIZE = 64
FAKE_IMAGES, FAKE_CHANNELS, FAKE_SIZE, FAKE_CLASSES = 640, 3, 32, 10
AFFINE_DEGREES, AFFINE_TRANSLATE = 10.0, 0.1  # digits / mnist augmentation
CIFAR10_PADDING = 4


class DataError(ValueError):
    """A data set that cannot be loaded as asked: a bad argument or missing files. One sentence, for the user."""


@dataclass
class DataBundle:
    """A data set ready to train on.

    ``train_loader`` yields shuffled ``(images, labels)`` batches, images float32 ``(N, in_channels, image_size,
    image_size)`` already normalised with ``mean``/``std`` (one value per channel), labels int64 ``(N,)`` in
    ``0..num_classes-1``; ``val_loader`` the same, unshuffled and never augmented.
    """

    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    val_size: int
    name: str


class TensorImages(Dataset):
    """Images held as one float32 tensor ``(N, C, H, W)`` with int64 labels ``(N,)``.

    ``transform`` (if any) maps a batch ``(B, C, H, W)`` to a batch, drawing its randomness per image: the
    DataLoader fetches a whole batch with :meth:`__getitems__`, so a batch costs one transform call, not ``B``
    (per-image calls of small ops are slow, and far slower with several threads on a busy CPU).
    ``source_indices`` says which rows of the source data set these are.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source_indices: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images, self.labels, self.source_indices, self.transform = images, labels, source_indices, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is None:
            return self.images[i], self.labels[i]
        return self.transform(self.images[i:i + 1])[0], self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index] if self.transform is None else self.transform(self.images[index])
        return list(zip(images.unbind(0), self.labels[index].unbind(0)))


class RandomAffineNormalize:
    """Each image of a batch ``(B, C, H, W)`` (square, values in [0, 1]) rotated by an angle uniform in
    +-``degrees`` and shifted by up to ``translate`` of its side along each axis (uniform), bilinear, with 0 (the
    background) filled in; then normalised, ``(x - mean) / std`` per channel. One ``grid_sample`` for the batch.
    Draws from torch's global generator, as torchvision's transforms do."""

    def __init__(self, degrees: float, translate: float, mean: Sequence[float], std: Sequence[float]):
        self.degrees, self.translate = degrees, translate
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        angle = (2 * torch.rand(n) - 1) * math.radians(self.degrees)
        shift = (2 * torch.rand(n, 2) - 1) * (2 * self.translate)  # grid coordinates run -1..1: a side is 2
        cos, sin = angle.cos(), angle.sin()
        # theta maps output to input coordinates, so the image moves by its inverse: a rotation and a shift from
        # the same symmetric ranges (the shift turned by the small angle), which is what is wanted.
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (moved - self.mean) / self.std


def load_data(name: str = "digits", *, root: str | os.PathLike | None = None, batch_size: int = 64,
              augment: bool = False, val_fraction: float = 0.2, seed: int = 0, download: bool = False,
              num_workers: int = 0, image_size: int | None = None, pin_memory: bool = False) -> DataBundle:
    """Load data set ``name`` (one of :data:`DATASETS`) as a training and a validation DataLoader.

    ``root``: the directory that holds MNIST/CIFAR-10 (default :data:`DEFAULT_ROOT`) or the image folder
    (required for ``imagefolder``). ``val_fraction``: the share of the images held out for validation where
    the data set has no validation split of its own (``digits``, ``fake``, ``imagefolder`` without ``val/``).
    ``image_size``: the side of the square images the loaders yield; default the data set's own (28 for
    digits and MNIST, 32 for CIFAR-10 and fake, 64 for an image folder). ``download`` lets torchvision fetch
    MNIST/CIFAR-10 into ``root``; never done otherwise. ``num_workers``/``pin_memory`` go to both loaders.
    Raises :class:`DataError` for an unknown name, a bad argument, or files that are not there.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}.")
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}.")
    if not _is_int(num_workers) or num_workers < 0:
        raise DataError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    if not _is_int(seed):
        raise DataError(f"seed must be an integer, got {seed!r}.")
    root = None if root is None else Path(root).expanduser()

    loader_options = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
    if name == "digits":
        parts = _digits(augment, val_fraction, seed, image_size or DIGITS_SIZE)
    elif name == "fake":
        parts = _fake(val_fraction, seed, image_size or FAKE_SIZE)
    elif name == "imagefolder":
        parts = _imagefolder(root, augment, val_fraction, seed, image_size or IMAGEFOLDER_SIZE)
    else:
        parts = _torchvision(name, root or DEFAULT_ROOT, augment, download, image_size)
    train_set, val_set, class_names, in_channels, size, mean, std = parts

    shuffle_generator = torch.Generator().manual_seed(seed)
    return DataBundle(
        train_loader=DataLoader(train_set, shuffle=True, generator=shuffle_generator, **loader_options),
        val_loader=DataLoader(val_set, shuffle=False, **loader_options),
        num_classes=len(class_names), in_channels=in_channels, image_size=size, class_names=list(class_names),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        train_size=len(train_set), val_size=len(val_set), name=name)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the positions of ``labels`` (int64 ``(N,)``) into sorted training and validation indices.

    Each class gives ``round(val_fraction * its count)`` of its items, chosen by a generator seeded with
    ``seed``, to validation, but at least one and never all of them when it has two or more (a class with one
    item stays in training). The same labels, fraction and seed always give the same split.
    """
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(labels).tolist():  # sorted, so the generator's draws do not depend on order
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# ---------------------------------------------------------------------------------------------------------
# The data sets. Each returns (train set, val set, class names, channels, image size, mean, std).
# ---------------------------------------------------------------------------------------------------------

def _digits(augment: bool, val_fraction: float, seed: int, image_size: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / DIGITS_MAX  # (1797, 1, 8, 8), 0..1
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)

    mean = images[train_idx].double().mean().item()
    std = images[train_idx].double().std().item()
    normalized = (images - mean) / std
    val_set = TensorImages(normalized[val_idx], labels[val_idx], val_idx)
    if augment:  # augment the [0, 1] images, so the affine's fill (0) is the background, then normalise
        transform = RandomAffineNormalize(AFFINE_DEGREES, AFFINE_TRANSLATE, (mean,), (std,))
        train_set = TensorImages(images[train_idx], labels[train_idx], train_idx, transform)
    else:
        train_set = TensorImages(normalized[train_idx], labels[train_idx], train_idx)
    class_names = [str(c) for c in digits.target_names.tolist()]
    return train_set, val_set, class_names, 1, image_size, (mean,), (std,)


def _fake(val_fraction: float, seed: int, image_size: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(FAKE_IMAGES, FAKE_CHANNELS, image_size, image_size, generator=generator)
    labels = torch.randint(FAKE_CLASSES, (FAKE_IMAGES,), generator=generator)
    n_val = round(val_fraction * FAKE_IMAGES)
    indices = torch.arange(FAKE_IMAGES)
    train_set = TensorImages(images[n_val:], labels[n_val:], indices[n_val:])
    val_set = TensorImages(images[:n_val], labels[:n_val], indices[:n_val])
    class_names = [str(c) for c in range(FAKE_CLASSES)]
    mean, std = (0.0,) * FAKE_CHANNELS, (1.0,) * FAKE_CHANNELS
    return train_set, val_set, class_names, FAKE_CHANNELS, image_size, mean, std


def _torchvision(name: str, root: Path, augment: bool, download: bool, image_size: int | None):
    from torchvision import datasets
    from torchvision.transforms import v2

    if name == "mnist":
        cls, mean, std, native, channels, where = datasets.MNIST, MNIST_MEAN, MNIST_STD, 28, 1, "MNIST/raw/"
        augmentation = [_affine()]
    else:
        cls, mean, std, native, channels, where = (datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, 32, 3,
                                                   "cifar-10-batches-py/")
        augmentation = [v2.RandomCrop(native, padding=CIFAR10_PADDING), v2.RandomHorizontalFlip()]
    size = image_size or native
    resize = [] if size == native else [v2.Resize((size, size), antialias=True)]

    def transform(extra: Sequence) -> v2.Compose:
        return v2.Compose([v2.ToImage(), *resize, *extra, v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean, std), v2.ToPureTensor()])

    if not download and not root.is_dir():
        raise DataError(f"the data directory {root} does not exist: pass --data-root DIR pointing at a directory "
                        f"that holds {where}, or --download to fetch {name} into it.")
    try:
        train_transform = transform(augmentation if augment else [])
        train_set = cls(str(root), train=True, download=download, transform=train_transform)
        val_set = cls(str(root), train=False, download=download, transform=transform([]))
    except RuntimeError as exc:
        if download:
            raise DataError(f"could not download {name} into {root}: {exc}") from exc
        raise DataError(f"{name} was not found in {root} (looked for {where}): pass --data-root DIR pointing at a "
                        f"directory that holds it, or --download to fetch it there.") from exc
    except OSError as exc:  # a failed download (URLError), an unreadable or unwritable directory
        raise DataError(f"could not {'download' if download else 'read'} {name} in {root}: {exc}") from exc
    class_names = [str(c) for c in range(10)] if name == "mnist" else list(train_set.classes)
    return train_set, val_set, class_names, channels, size, mean, std


def _imagefolder(root: Path | None, augment: bool, val_fraction: float, seed: int, image_size: int):
    from torchvision.transforms import v2

    if root is None:
        raise DataError("the imagefolder data set needs --data-root DIR: a directory with train/ and val/ folders "
                        "of class folders of images (or just class folders, split by --val-fraction).")
    if not root.is_dir():
        raise DataError(f"the image folder {root} does not exist: pass --data-root DIR pointing at a directory "
                        f"with train/ and val/ folders of class folders of images.")

    def transform(extra: Sequence) -> v2.Compose:
        return v2.Compose([v2.ToImage(), *extra, v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()])

    plain = transform([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    train_transform = transform([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
                                if augment else [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise DataError(f"the image folder {root} has a val/ folder but no train/ folder beside it.")
    if train_dir.is_dir() and val_dir.is_dir():
        train_set, val_set = _image_folder(train_dir, train_transform), _image_folder(val_dir, plain)
        if train_set.classes != val_set.classes:
            raise DataError(f"the class folders of {train_dir} ({', '.join(train_set.classes)}) and {val_dir} "
                            f"({', '.join(val_set.classes)}) differ.")
        classes = train_set.classes
    else:
        base = train_dir if train_dir.is_dir() else root
        train_all, val_all = _image_folder(base, train_transform), _image_folder(base, plain)
        train_idx, val_idx = stratified_split(torch.tensor(train_all.targets), val_fraction, seed)
        if len(val_idx) == 0:
            raise DataError(f"the image folder {base} has too few images to hold out a validation split "
                            f"(every class needs two or more).")
        train_set, val_set = Subset(train_all, train_idx.tolist()), Subset(val_all, val_idx.tolist())
        classes = train_all.classes
    return train_set, val_set, list(classes), 3, image_size, IMAGENET_MEAN, IMAGENET_STD


def _image_folder(directory: Path, transform: Callable):
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(directory), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
        raise DataError(f"no images were found in {directory}: it needs one folder per class with the images "
                        f"(.png, .jpg, ...) inside.") from exc


def _affine():
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=AFFINE_DEGREES, translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
                           interpolation=v2.InterpolationMode.BILINEAR)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
