"""The doctor's data sets (cnnperf.zoo.data): the digits split and normalisation, augmentation, the fake data,
MNIST / CIFAR-10 / ImageFolder read from small files written here, and the errors.

Nothing is downloaded: MNIST and CIFAR-10 are tiny stand-ins in the real on-disk formats.
"""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from cnnperf.zoo import data
from cnnperf.zoo.data import DATASETS, DataError, load_data

DIGITS = load_digits()
DIGITS_LABELS = torch.from_numpy(DIGITS.target).long()


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(loader_or_set) -> torch.Tensor:
    """Every image of a data set in order (through the batched read the loader uses, where there is one)."""
    dataset = getattr(loader_or_set, "dataset", loader_or_set)
    if hasattr(dataset, "__getitems__"):
        return torch.stack([image for image, _ in dataset.__getitems__(list(range(len(dataset))))])
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _labels(dataset) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


def _sizes(bundle) -> tuple[int, int, int, int, int]:
    return bundle.train_size, bundle.val_size, bundle.num_classes, bundle.in_channels, bundle.image_size


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message[:-1] and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# digits: the default, real 8x8 images resized to 28x28.
# ---------------------------------------------------------------------------------------------------------

def test_digits_split_is_complete_stratified_and_seeded():
    bundle = load_data("digits", seed=0)
    train, val = bundle.train_loader.dataset.source_indices, bundle.val_loader.dataset.source_indices
    assert bundle.name == "digits" and len(DIGITS_LABELS) == 1797
    assert (bundle.train_size, bundle.val_size) == (len(train), len(val))
    assert bundle.train_size + bundle.val_size == 1797
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1797))  # disjoint, nothing lost
    for c in range(10):  # each class holds out its own 20%
        count = int((DIGITS_LABELS == c).sum())
        assert int((DIGITS_LABELS[val] == c).sum()) == round(0.2 * count)
    assert 355 <= bundle.val_size <= 365
    assert torch.equal(bundle.train_loader.dataset.labels, DIGITS_LABELS[train])
    assert torch.equal(bundle.val_loader.dataset.labels, DIGITS_LABELS[val])

    again = load_data("digits", seed=0)
    assert torch.equal(again.val_loader.dataset.source_indices, val)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.val_loader.dataset.source_indices, val)
    assert other.val_size == bundle.val_size

    bigger = load_data("digits", val_fraction=0.5)
    assert 890 <= bigger.val_size <= 905


def test_digits_are_resized_28x28_and_normalised_with_the_training_statistics():
    bundle = load_data("digits")
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.class_names == [str(c) for c in range(10)]
    train, val = _images(bundle.train_loader), _images(bundle.val_loader)
    assert train.shape == (bundle.train_size, 1, 28, 28) and train.dtype == torch.float32
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-4
    assert abs(val.mean().item()) < 0.1 and abs(val.std().item() - 1) < 0.1  # held out: close, not exact

    # Un-normalised, each image is its 8x8 digit (0..16 -> 0..1) resized bilinearly; mean/std are the training
    # split's pixel statistics, not the whole set's.
    (mean,), (std,) = bundle.mean, bundle.std
    raw = torch.from_numpy(DIGITS.images).float().unsqueeze(1) / 16
    resized = F.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    train_idx, val_idx = bundle.train_loader.dataset.source_indices, bundle.val_loader.dataset.source_indices
    torch.testing.assert_close(val * std + mean, resized[val_idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(train * std + mean, resized[train_idx], atol=1e-5, rtol=0)
    assert mean == pytest.approx(resized[train_idx].double().mean().item(), abs=1e-6)
    assert mean != pytest.approx(resized[val_idx].double().mean().item(), abs=1e-4)
    assert std == pytest.approx(resized[train_idx].double().std().item(), abs=1e-6)


def test_digits_loaders_shuffle_training_by_seed_and_keep_validation_in_order():
    first = [torch.cat([y for _, y in load_data("digits", seed=3, batch_size=50).train_loader]) for _ in range(2)]
    assert torch.equal(first[0], first[1])  # the same order for the same seed, whatever torch's global state
    bundle = load_data("digits", seed=3, batch_size=50)
    order = torch.cat([y for _, y in bundle.train_loader])
    assert not torch.equal(order, bundle.train_loader.dataset.labels)  # shuffled
    assert sorted(order.tolist()) == sorted(bundle.train_loader.dataset.labels.tolist())
    images, labels = zip(*bundle.val_loader)
    assert [len(y) for y in labels] == [50] * 7 + [bundle.val_size - 350]
    assert torch.equal(torch.cat(labels), bundle.val_loader.dataset.labels)  # not shuffled
    assert torch.equal(torch.cat(images), bundle.val_loader.dataset.images)
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_digits_image_size():
    bundle = load_data("digits", image_size=32, batch_size=8)
    x, _ = next(iter(bundle.val_loader))
    assert bundle.image_size == 32 and x.shape == (8, 1, 32, 32)


def test_augment_changes_training_images_but_not_validation_images():
    plain, augmented = load_data("digits", seed=0), load_data("digits", seed=0, augment=True)
    assert torch.equal(_images(augmented.val_loader), _images(plain.val_loader))
    assert augmented.mean == plain.mean and augmented.std == plain.std

    first, second = _images(augmented.train_loader), _images(augmented.train_loader)
    unchanged = _images(plain.train_loader)
    assert first.shape == unchanged.shape
    def changed(a, b):
        return ((a - b).abs().flatten(1).amax(1) > 0.1).float().mean().item()

    assert changed(first, unchanged) > 0.95 and changed(first, second) > 0.95  # a new draw for each read
    # Still the same digits, moved a little: each resembles its own original more than another digit does.
    (mean,), (std,) = plain.mean, plain.std
    moved, originals = (first * std + mean).flatten(1), (unchanged * std + mean).flatten(1)
    own = F.cosine_similarity(moved, originals).mean()  # about 0.89
    other = F.cosine_similarity(moved, originals.roll(1, 0)).mean()  # about 0.73: digits are blobs at 8x8
    assert own > other + 0.1
    assert moved.min() > -1e-6 and moved.max() < 1 + 1e-6  # the fill is the background, 0
    image, label = augmented.train_loader.dataset[0]  # one image at a time (indexing) is augmented as well
    assert image.shape == (1, 28, 28) and not torch.equal(image, plain.train_loader.dataset[0][0])
    assert torch.equal(label, plain.train_loader.dataset[0][1])

    # The loader's batched path (__getitems__) augments too, and still yields the right labels.
    batches = list(augmented.train_loader)
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert images.shape == unchanged.shape
    assert sorted(labels.tolist()) == sorted(plain.train_loader.dataset.labels.tolist())
    assert (images.mean().abs() < 0.2) and 0.8 < images.std() < 1.1  # moved [0, 1] images, then normalised


def test_affine_with_no_rotation_and_no_shift_only_normalises():
    images = torch.rand(5, 1, 28, 28)
    identity = data.RandomAffineNormalize(0.0, 0.0, (0.25,), (0.5,))
    torch.testing.assert_close(identity(images), (images - 0.25) / 0.5, atol=1e-5, rtol=0)
    quarter_turn = data.RandomAffineNormalize(0.0, 0.5, (0.0,), (1.0,))
    assert not torch.allclose(quarter_turn(images), images, atol=1e-3)


def test_loader_with_a_worker_process():
    bundle = load_data("digits", augment=True, num_workers=1, batch_size=256)
    shapes = [tuple(x.shape) for x, _ in bundle.train_loader]
    assert shapes[0] == (256, 1, 28, 28) and sum(s[0] for s in shapes) == bundle.train_size


# ---------------------------------------------------------------------------------------------------------
# fake.
# ---------------------------------------------------------------------------------------------------------

def test_fake_data_is_random_seeded_and_3x32x32():
    bundle = load_data("fake", batch_size=32)
    assert _sizes(bundle) == (512, 128, 10, 3, 32)
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    val = _images(bundle.val_loader)
    assert abs(val.mean().item()) < 0.05 and abs(val.std().item() - 1) < 0.05
    assert bundle.mean == (0.0, 0.0, 0.0) and bundle.std == (1.0, 1.0, 1.0)
    assert torch.equal(_images(load_data("fake").val_loader), val)
    assert not torch.equal(_images(load_data("fake", seed=1).val_loader), val)
    assert torch.equal(_images(load_data("fake", augment=True).val_loader), val)
    assert _sizes(load_data("fake", val_fraction=0.5))[:2] == (320, 320)
    assert load_data("fake", image_size=16).train_loader.dataset.images.shape[1:] == (3, 16, 16)


# ---------------------------------------------------------------------------------------------------------
# MNIST and CIFAR-10: local files only, and clear errors without them.
# ---------------------------------------------------------------------------------------------------------

def _write_mnist(root, n_train=20, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


def test_mnist_from_local_files(tmp_path):
    _write_mnist(tmp_path)
    bundle = load_data("mnist", root=tmp_path, batch_size=8)
    assert _sizes(bundle) == (20, 10, 10, 1, 28)
    assert bundle.class_names == [str(c) for c in range(10)]
    assert bundle.mean == (0.1307,) and bundle.std == (0.3081,)
    x, y = next(iter(bundle.val_loader))
    assert type(x) is torch.Tensor and x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, torch.arange(8))  # the test split, in order
    # Uniform random bytes: mean 0.5, std ~0.289 before normalising.
    assert (x.mean() * 0.3081 + 0.1307).item() == pytest.approx(0.5, abs=0.02)
    augmented = load_data("mnist", root=tmp_path, batch_size=8, augment=True)
    assert torch.equal(next(iter(augmented.val_loader))[0], x)
    assert not torch.equal(augmented.train_loader.dataset[0][0], bundle.train_loader.dataset[0][0])
    assert next(iter(load_data("mnist", root=tmp_path, image_size=32).val_loader))[0].shape[1:] == (1, 32, 32)


def test_cifar10_from_local_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    import torchvision.datasets.cifar
    # The stand-in files cannot match the real files' MD5s; presence is what is checked here.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))

    bundle = load_data("cifar10", root=tmp_path, batch_size=4, augment=True)
    assert _sizes(bundle) == (20, 4, 10, 3, 32)
    assert bundle.class_names == names and bundle.mean == data.CIFAR10_MEAN and bundle.std == data.CIFAR10_STD
    x, y = next(iter(bundle.val_loader))
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, torch.tensor([0, 1, 2, 3]))
    assert next(iter(bundle.train_loader))[0].shape == (4, 3, 32, 32)
    plain = load_data("cifar10", root=tmp_path)
    assert not torch.equal(bundle.train_loader.dataset[0][0], plain.train_loader.dataset[0][0])  # crop + flip


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_a_missing_root_raises_data_error_naming_the_directory(name, tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError) as error:
        load_data(name, root=missing)
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message and "--data-root" in message
    assert _one_sentence(message)
    if name != "imagefolder":
        assert "--download" in message
    assert not missing.exists()  # nothing downloaded, nothing created


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_root_without_the_files_raises_data_error(name, tmp_path):
    with pytest.raises(DataError, match="--download") as error:
        load_data(name, root=tmp_path)
    assert str(tmp_path) in str(error.value) and _one_sentence(str(error.value))
    assert os.listdir(tmp_path) == []


def test_no_root_means_the_default_directory_for_mnist_and_is_an_error_for_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_ROOT", tmp_path / "cache")
    with pytest.raises(DataError, match="--download") as error:
        load_data("mnist")
    assert str(tmp_path / "cache") in str(error.value)
    with pytest.raises(DataError, match="--data-root"):
        load_data("imagefolder")


# ---------------------------------------------------------------------------------------------------------
# ImageFolder.
# ---------------------------------------------------------------------------------------------------------

def _write_images(folder, count, size=(40, 30), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_imagefolder_with_train_and_val(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        _write_images(tmp_path / split / "cat", count)
        _write_images(tmp_path / split / "dog", count, size=(50, 64), mode="L")  # grey, other size
    bundle = load_data("imagefolder", root=tmp_path, image_size=32, batch_size=3)
    assert _sizes(bundle) == (8, 4, 2, 3, 32) and bundle.class_names == ["cat", "dog"]
    assert bundle.mean == data.IMAGENET_MEAN and bundle.std == data.IMAGENET_STD
    images, labels = zip(*bundle.val_loader)
    assert [tuple(x.shape) for x in images] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert torch.cat(labels).tolist() == [0, 0, 1, 1] and type(images[0]) is torch.Tensor
    # ImageNet normalisation of uniform random bytes: about (0.5 - 0.45) / 0.23 on average.
    assert 0.0 < torch.cat(images).mean().item() < 0.5
    assert load_data("imagefolder", root=tmp_path).image_size == 64
    augmented = load_data("imagefolder", root=tmp_path, image_size=32, augment=True)
    assert next(iter(augmented.train_loader))[0].shape == (8, 3, 32, 32)


def test_imagefolder_without_val_is_split_by_class_and_seed(tmp_path):
    for name in ("a", "b", "c"):
        _write_images(tmp_path / name, 10, size=(16, 16))
    bundle = load_data("imagefolder", root=tmp_path, image_size=16, val_fraction=0.2, seed=0)
    assert (bundle.train_size, bundle.val_size, bundle.class_names) == (24, 6, ["a", "b", "c"])
    val_labels = _labels(bundle.val_loader.dataset)
    assert torch.equal(val_labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    indices = bundle.val_loader.dataset.indices
    assert load_data("imagefolder", root=tmp_path, image_size=16, seed=0).val_loader.dataset.indices == indices
    assert load_data("imagefolder", root=tmp_path, image_size=16, seed=5).val_loader.dataset.indices != indices
    assert not set(indices) & set(bundle.train_loader.dataset.indices)

    only_train = tmp_path / "nested"
    for name in ("x", "y"):
        _write_images(only_train / "train" / name, 5, size=(16, 16))
    split = load_data("imagefolder", root=only_train, image_size=16)
    assert (split.train_size, split.val_size, split.class_names) == (8, 2, ["x", "y"])


def test_imagefolder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images") as error:
        load_data("imagefolder", root=empty)
    assert str(empty) in str(error.value) and _one_sentence(str(error.value))

    mismatch = tmp_path / "mismatch"
    _write_images(mismatch / "train" / "cat", 2)
    _write_images(mismatch / "val" / "dog", 2)
    with pytest.raises(DataError, match="differ"):
        load_data("imagefolder", root=mismatch)

    single = tmp_path / "single"
    for name in ("a", "b"):
        _write_images(single / name, 1)
    with pytest.raises(DataError, match="too few images"):
        load_data("imagefolder", root=single)


# ---------------------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(name="imagenet"), "unknown data set"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-4), "batch_size"), (dict(batch_size=2.5), "batch_size"),
    (dict(val_fraction=0), "val_fraction"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"), (dict(val_fraction=1.5), "val_fraction"),
    (dict(num_workers=-1), "num_workers"), (dict(image_size=0), "image_size"),
])
def test_bad_arguments_raise_data_error(kwargs, named):
    with pytest.raises(DataError) as error:
        load_data(**kwargs)
    assert isinstance(error.value, ValueError)
    assert named in str(error.value) and _one_sentence(str(error.value))
    if named == "unknown data set":
        assert all(name in str(error.value) for name in DATASETS)


def test_stratified_split():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, val = data.stratified_split(labels, 0.2, seed=0)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(18))
    # round(0.2 * count), but at least one, never all, and never a class's only item
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert torch.equal(data.stratified_split(labels, 0.2, seed=0)[1], val)
    assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
