"""The one training loop: determinism, augmentation, learning, devices."""

from __future__ import annotations

import pytest
import torch

from benchmark.errors import UEBenchError
from benchmark.models import create_model
from benchmark.training import TrainConfig, evaluate, random_crop, random_flip, resolve_device, train

CPU = torch.device("cpu")
TINY = TrainConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adamw")


def _trained(data, seed):
    torch.manual_seed(seed)
    model = create_model("resnet_tiny", data.num_classes)
    train(model, data.images, data.labels, TINY, device=CPU, seed=seed)
    return model


def test_deterministic_for_a_seed(tiny_train):
    a, b = _trained(tiny_train, 0), _trained(tiny_train, 0)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), f"{name} differs between two runs with the same seed"
    c = _trained(tiny_train, 1)
    assert not torch.equal(a.net.fc.weight, c.net.fc.weight), "another seed gave identical weights"


def test_crop_and_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    assert torch.equal(random_crop(x, 0, gen), x), "padding 0 must be the identity"
    y = random_crop(x, 2, gen)
    assert y.shape == x.shape, y.shape
    flips = torch.stack([random_flip(x, gen) for _ in range(20)])
    assert (flips == x.flip(3)).all(dim=(2, 3, 4)).any(), "never flipped in 20 tries"
    assert (flips == x).all(dim=(2, 3, 4)).any(), "always flipped in 20 tries"


def test_learns_a_trivial_task():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.where(labels[:, None, None, None].bool(), 200, 50).expand(64, 3, 8, 8).to(torch.uint8)
    images = (images.int() + torch.randint(-20, 20, images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    torch.manual_seed(0)
    model = create_model("resnet_tiny", 2, image_size=8)
    result = train(model, images, labels, TrainConfig(epochs=5, batch_size=16, lr=3e-3, optimizer="adamw",
                                                      augment="none"), device=CPU, seed=0)
    acc = evaluate(model, images, labels, CPU)
    assert acc > 90, f"failed to learn bright-vs-dark: {acc:.1f}% (train {result.train_accuracy:.1f}%)"


def test_config_validation():
    with pytest.raises(UEBenchError, match="optimizer='lion' must be one of"):
        TrainConfig(optimizer="lion")
    with pytest.raises(UEBenchError, match="augment"):
        TrainConfig(augment="mixup")


def test_float_inputs_need_no_augmentation():
    with pytest.raises(UEBenchError, match="needs uint8 images"):
        train(torch.nn.Linear(4, 2), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), TrainConfig(epochs=1),
              device=CPU, seed=0)


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UEBenchError, match="must be auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UEBenchError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_trains_on_cuda(tiny_train):
    model = create_model("resnet_tiny", tiny_train.num_classes)
    train(model, tiny_train.images, tiny_train.labels, TINY, device=torch.device("cuda"), seed=0)
    assert next(model.parameters()).is_cuda, "model did not move to CUDA"
