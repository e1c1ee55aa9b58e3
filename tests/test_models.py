"""The models build for every dataset shape, train, and expose their dropout and layers."""

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from livetrain.playground.data import load_datasets
from livetrain.playground.models import (
    MODEL_NAMES,
    ModelUnavailable,
    build_model,
    monitored_layers,
    set_dropout,
)

# (in_channels, image_size): digits, MNIST, CIFAR-10, a small Imagenette.
TRAIN_SHAPES = [(1, 8), (1, 28), (3, 32), (3, 64)]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), TRAIN_SHAPES)
def test_forward_and_backward(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size, dropout=0.5)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_imagenet_size_forward(name: str) -> None:
    model = build_model(name, 7, 3, 224, dropout=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [28, 224])
def test_set_dropout_reaches_every_dropout(name: str, size: int) -> None:
    model = build_model(name, 10, 3, size, dropout=0.5)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    assert set_dropout(model, 0.2) == len(dropouts)
    assert all(m.p == 0.2 for m in dropouts)


def test_dropout_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="dropout"):
        build_model("smallcnn", 10, 1, 28, dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(build_model("smallcnn", 10, 1, 28, dropout=0.5), -0.1)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 64)])
def test_monitored_layers_in_forward_order(name: str, channels: int, size: int) -> None:
    model = build_model(name, 10, channels, size, dropout=0.5)
    layers = monitored_layers(model)
    names = [layer.name for layer in layers]
    assert len(set(names)) == len(names)

    all_convs_and_fcs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert [layer.module for layer in layers] == all_convs_and_fcs
    counts: dict[str, int] = {}
    for layer in layers:
        expected = "conv" if isinstance(layer.module, nn.Conv2d) else "fc"
        assert layer.layer_type == expected
        assert layer.nn_part == layer.name.split(".")[0]
        assert layer.number == counts.get(layer.nn_part, 0)
        counts[layer.nn_part] = layer.number + 1
        assert model.get_submodule(layer.name) is layer.module

    fired: list[str] = []
    for layer in layers:
        layer.module.register_forward_hook(lambda *_, n=layer.name: fired.append(n))
    model(torch.randn(1, channels, size, size))
    assert fired == names
    assert layers[-1].layer_type == "fc"  # the head comes last


def test_unknown_and_meaningless_models_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("lenet", 10, 1, 28, dropout=0.5)
    with pytest.raises(ModelUnavailable, match="no pretrained"):
        build_model("smallcnn", 10, 3, 224, dropout=0.5, pretrained=True)
    with pytest.raises(ModelUnavailable, match="3-channel"):
        build_model("resnet18", 10, 1, 224, dropout=0.5, pretrained=True)
    with pytest.raises(ModelUnavailable, match="at least 64"):
        build_model("alexnet", 10, 3, 32, dropout=0.5, transfer=True)


def test_pretrained_weights_unavailable_offline(tmp_path, monkeypatch) -> None:
    """With an empty weights cache the download is tried; offline it fails with one message."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        model = build_model("resnet18", 10, 3, 224, dropout=0.5, pretrained=True)
    except ModelUnavailable as e:
        message = str(e)
        assert "download.pytorch.org" in message
        assert str(tmp_path / "hub" / "checkpoints") in message
    else:  # the network works here: the real weights were downloaded
        assert model.fc[1].out_features == 10


def test_transfer_loads_cached_weights_and_trains_only_the_head(tmp_path, monkeypatch) -> None:
    """A weights file in the torch hub cache is used without any network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = tvm.ResNet18_Weights.DEFAULT
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1)
    reference = tvm.resnet18().state_dict()
    torch.save(reference, checkpoints / weights.url.rsplit("/", 1)[1])

    model = build_model("resnet18", 10, 3, 32, dropout=0.3, transfer=True)
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.1.weight", "fc.1.bias"}
    assert model.fc[0].p == 0.3
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.conv1.weight.grad is None


def test_smallcnn_learns_mnist5k() -> None:
    """A few seeded Adam steps must lower the loss on a fixed batch: a real learning check."""
    torch.manual_seed(0)
    train, _, info = load_datasets("mnist5k")
    images, labels = train.tensors
    model = build_model("smallcnn", info.num_classes, info.in_channels, info.image_size, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe_x, probe_y = images[:256], labels[:256]

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(probe_x), probe_y).item()
        model.train()
        return loss

    before = probe_loss()
    for step in range(30):
        batch = slice(256 + 64 * step, 256 + 64 * (step + 1))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = probe_loss()
    assert before > 2.0  # about ln(10) for an untrained 10-class model
    assert after < 0.5 * before
