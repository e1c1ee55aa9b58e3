"""Datasets load offline with sane splits and normalization, and missing ones say what to run."""

import time

import pytest
import torch
from PIL import Image

import get_dataset
from livetrain.playground.data import DatasetUnavailable, load_datasets, make_loaders


@pytest.fixture(scope="module")
def mnist5k():
    return load_datasets("mnist5k")


def test_mnist5k_shapes_split_and_normalization(mnist5k) -> None:
    train, val, info = mnist5k
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert info.classes == tuple("0123456789")
    assert (len(train), len(val)) == (4500, 500)
    images, labels = train.tensors
    assert images.shape == (4500, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert abs(images.mean().item()) < 1e-4
    assert abs(images.std().item() - 1) < 1e-4
    x, y = val[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10


def test_split_is_seeded() -> None:
    _, same, _ = load_datasets("digits", seed=0)
    _, again, _ = load_datasets("digits", seed=0)
    _, other, _ = load_datasets("digits", seed=1)
    assert torch.equal(same.tensors[1], again.tensors[1])
    assert not torch.equal(same.tensors[1], other.tensors[1])


def test_digits() -> None:
    train, val, info = load_datasets("digits", val_fraction=0.2)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert len(train) + len(val) == 1797 and len(val) == 359
    images = train.tensors[0]
    assert images.shape[1:] == (1, 8, 8)
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-4


def test_in_memory_images_resize() -> None:
    train, _, info = load_datasets("digits", image_size=16)
    assert info.image_size == 16 and train.tensors[0].shape[1:] == (1, 16, 16)


def test_unknown_dataset_says_what_to_run() -> None:
    with pytest.raises(DatasetUnavailable, match=r"get_dataset\.py"):
        load_datasets("no-such-dataset")


def test_missing_torchvision_dataset_says_what_to_run(tmp_path) -> None:
    with pytest.raises(DatasetUnavailable, match=r"CIFAR-10 is not in .*get_dataset\.py cifar10"):
        load_datasets("cifar10", data_dir=str(tmp_path))


def test_image_folder(tmp_path) -> None:
    """The user's own images: one sub-folder per class, any size, loaded as RGB."""
    generator = torch.Generator().manual_seed(0)
    for label, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        (tmp_path / label).mkdir()
        for i in range(5):
            noise = torch.randint(0, 30, (3,), generator=generator).tolist()
            pixel = tuple(c + n for c, n in zip(colour, noise, strict=True))
            mode = "L" if i == 0 else "RGB"  # a grayscale file must come out RGB too
            Image.new("RGB", (20 + i, 16), pixel).convert(mode).save(tmp_path / label / f"{i}.png")

    train, val, info = load_datasets(str(tmp_path), val_fraction=0.2, image_size=16)
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, 16)
    assert info.classes == ("cat", "dog")
    assert (len(train), len(val)) == (8, 2)
    train_loader, val_loader = make_loaders(train, val, batch_size=4)
    images, labels = next(iter(train_loader))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in val_loader) == 2


def test_empty_folder_is_unavailable(tmp_path) -> None:
    with pytest.raises(DatasetUnavailable, match="class sub-folders"):
        load_datasets(str(tmp_path))


def test_loaders_shuffle_by_seed_and_keep_validation_order(mnist5k) -> None:
    train, val, _ = mnist5k

    def first_labels(seed: int) -> tuple[list[int], list[int]]:
        train_loader, val_loader = make_loaders(train, val, batch_size=64, seed=seed)
        return next(iter(train_loader))[1].tolist(), next(iter(val_loader))[1].tolist()

    train_a, val_a = first_labels(0)
    train_b, val_b = first_labels(0)
    train_c, val_c = first_labels(1)
    assert train_a == train_b and train_a != train_c
    assert val_a == val_b == val_c == val.tensors[1][:64].tolist()


def test_get_dataset_offline_needs_nothing(capsys) -> None:
    assert get_dataset.main(["mnist5k"]) == 0
    assert "nothing needs downloading" in capsys.readouterr().out


def test_get_dataset_download_fails_cleanly_offline(tmp_path, capsys) -> None:
    """No network here: one clear line and exit 1. Should the network work, the files exist."""
    started = time.monotonic()
    code = get_dataset.main(["cifar10", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10 or code == 0
    if code == 0:
        assert load_datasets("cifar10", data_dir=str(tmp_path))[2].num_classes == 10
    else:
        assert code == 1
        assert "Downloading CIFAR-10 failed" in err and "--dataset PATH" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
