"""Countermeasures: each transforms a tiny batch as specified, composes with a base paradigm, runs
through the runner, and meets its clean reference (the ``clean`` defense under the same attack config)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from attacks._ops import MaxLoss, fit_linear, orthonormal_directions, project_out, ueraser_augment
from attacks.countermeasures import (BASES, AdvTraining, Countermeasure, CutMix, Cutout, IssGray, IssJpeg, MixUp,
                                     OrthoProjection)
from benchmark.config import configure
from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor, run_grid
from benchmark.models import create_model
from benchmark.plan import plan
from benchmark.presets import PRESETS, preset_from_dict
from benchmark.registry import ATTACKS
from benchmark.report import results_frame
from benchmark.store import Store
from benchmark.training import to_float
from leaderboard.build import cells_board
from leaderboard.site import render
from leaderboard.tables import countermeasure_frames, group_markdown

FAST = {"epochs": 1, "batch_size": 16, "augment": "none"}
COUNTERMEASURES = sorted(n for n in ATTACKS.names() if issubclass(ATTACKS.get(n), Countermeasure))


def _batch(data, n=16):
    return to_float(data.images[:n]), data.labels[:n]


def test_the_countermeasures_are_registered():
    assert COUNTERMEASURES == ["adv_training", "cutmix", "cutout", "iss_gray", "iss_jpeg", "mixup",
                               "ortho_projection", "ueraser"], COUNTERMEASURES


def test_jpeg_is_the_library_encode_decode(tiny_train, ctx):
    out = IssJpeg(quality=10).transform(tiny_train, ctx)
    want = torch.stack(decode_jpeg(encode_jpeg(list(tiny_train.images), quality=10)))
    assert torch.equal(out.images, want), "iss_jpeg differs from torchvision's encode/decode at quality 10"
    assert not torch.equal(out.images, tiny_train.images), "JPEG at quality 10 left the images unchanged"
    assert torch.equal(out.labels, tiny_train.labels), "iss_jpeg changed the labels"


def test_gray_has_equal_channels(tiny_train, ctx):
    out = IssGray().transform(tiny_train, ctx).images
    assert out.shape == tiny_train.images.shape, f"iss_gray changed the shape to {tuple(out.shape)}"
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2]), "iss_gray: channels differ"
    assert not torch.equal(out, tiny_train.images), "iss_gray left colour images unchanged"


def test_projection_leaves_the_data_orthogonal_to_the_fitted_directions(tiny_train, ctx):
    cm = OrthoProjection(linear_epochs=3)
    w = fit_linear(tiny_train, cm.linear_config(), ctx)
    q = orthonormal_directions(w)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5), "Q's columns are not orthonormal"
    x, y = _batch(tiny_train)
    hook = cm.hooks(tiny_train, ctx).batch_hook
    projected, same = hook(None, x, y)
    assert torch.equal(same, y), "the projection changed the labels"
    residual = (projected.flatten(1) @ w.T).abs().max() / (x.flatten(1) @ w.T).abs().max()
    assert residual < 1e-4, f"projected images still have {residual:.2g} of their component along W"
    again = project_out(projected, q)
    assert torch.allclose(again, projected, atol=1e-5), "projecting twice changed the images (not a projection)"


def test_mixup_targets_are_the_convex_combination_of_the_images(tiny_train, ctx):
    torch.manual_seed(0)
    x, y = _batch(tiny_train)
    mixed, soft = MixUp().hooks(tiny_train, ctx).batch_hook(None, x, y)
    partner = x.roll(1, 0)
    diff = (x - partner).flatten()
    lam = float(((mixed - partner).flatten() @ diff) / (diff @ diff))
    assert torch.allclose(mixed, lam * x + (1 - lam) * partner, atol=1e-5), "mixup images are not one mix of two"
    onehot = F.one_hot(y, tiny_train.num_classes).float()
    want = lam * onehot + (1 - lam) * onehot.roll(1, 0)
    assert torch.allclose(soft, want, atol=1e-5), f"mixup targets are not lam={lam:.3f} times the labels' mix"


def test_cutmix_targets_mix_the_labels_by_the_pasted_area(tiny_train, ctx):
    torch.manual_seed(1)
    x = torch.rand(16, 3, 32, 32)  # no two images share a pixel value
    y = tiny_train.labels[:16]
    mixed, soft = CutMix().hooks(tiny_train, ctx).batch_hook(None, x, y)
    pasted = (mixed != x).any(1).float().mean((1, 2))
    assert torch.equal(pasted, pasted[:1].expand(16)), "cutmix pasted boxes of different sizes in one batch"
    assert torch.equal(mixed[:, :, (mixed != x).any(0).any(0)], x.roll(1, 0)[:, :, (mixed != x).any(0).any(0)]), \
        "cutmix pasted something other than the batch shifted by one"
    onehot = F.one_hot(y, tiny_train.num_classes).float()
    want = (1 - pasted[:, None]) * onehot + pasted[:, None] * onehot.roll(1, 0)
    assert torch.allclose(soft, want, atol=1e-5), "cutmix targets do not follow the pasted area"


def test_cutout_zeroes_one_square(tiny_train, ctx):
    x = torch.ones(32, 3, 32, 32)
    out, _ = Cutout().hooks(tiny_train, ctx).batch_hook(None, x, tiny_train.labels[:32])
    for i, img in enumerate(out):
        zero = img[0] == 0
        assert torch.equal(zero[None].expand(3, -1, -1), img == 0), f"image {i}: channels cut differently"
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 8 <= h <= 16 and 8 <= w <= 16, f"image {i}: cut {h}x{w}, expected a 16x16 square clipped at the border"
        assert int(zero.sum()) == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w, \
            f"image {i}: the zeroed pixels are not one rectangle"
    assert bool((out[:, :, 8:24, 8:24] == 0).any()), "no cut reached the centre"


def test_adversarial_training_stays_within_the_radius_and_raises_the_loss(tiny_train, ctx):
    scratch = configure(ATTACKS, "scratch", {"*": {**FAST, "epochs": 5, "optimizer": "adamw", "lr": 3e-3}}).plugin
    model = scratch.fit(tiny_train, "resnet_tiny", ctx).model  # a model that fits the images: a loss to raise
    model.train()
    x, y = _batch(tiny_train, 32)
    cm = AdvTraining()
    x_adv, same = cm.hooks(tiny_train, ctx).batch_hook(model, x, y)
    assert model.training and all(m.training for m in model.modules()), "the hook left the model in eval mode"
    assert torch.equal(same, y), "adversarial training changed the labels"
    assert float((x_adv - x).abs().max()) <= cm.eps + 1e-6, "PGD left the L∞ ball"
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1, "PGD left [0, 1]"
    model.eval()
    with torch.no_grad():
        before, after = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert after > before + 0.1, f"PGD did not raise the loss: {float(before):.3f} -> {float(after):.3f}"


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return x


def test_ueraser_takes_the_max_over_copies_then_one_copy(tiny_train):
    torch.manual_seed(0)
    model = create_model("resnet_tiny", tiny_train.num_classes, 32, 3).eval()
    x, y = _batch(tiny_train, 8)
    recorder = _Recorder()
    loss_fn = MaxLoss(recorder, repeats=5, repeat_steps=2)
    sizes = [len(loss_fn(model, x, y)[1]) for _ in range(3)]
    assert recorder.sizes == [40, 40, 8] and sizes == [8, 8, 8], f"augmented {recorder.sizes}, logits {sizes}"
    noisy = MaxLoss(lambda t: (t + 0.2 * torch.randn_like(t)).clamp(0, 1), repeats=5, repeat_steps=1)
    torch.manual_seed(3)
    loss, _ = noisy(model, x, y)
    torch.manual_seed(3)
    copies = (x.repeat(5, 1, 1, 1) + 0.2 * torch.randn(40, 3, 32, 32)).clamp(0, 1)
    each = F.cross_entropy(model(copies), y.repeat(5), reduction="none").view(5, -1)
    assert torch.allclose(loss, each.max(0).values.mean(), atol=1e-5), "the loss is not the mean of per-image maxima"
    assert loss > each.mean() + 1e-4, "the max over copies is not above their mean"
    augmented = ueraser_augment()(x)
    assert augmented.shape == x.shape and float(augmented.min()) >= -1e-5 and float(augmented.max()) <= 1 + 1e-5, \
        "UEraser's augmentation changed the shape or left [0, 1]"
    assert not torch.equal(augmented, x), "UEraser's augmentation changed nothing"


def test_a_countermeasure_starts_from_its_base_paradigm():
    protocol = PRESETS["quick"].attack_protocol
    plain = configure(ATTACKS, "iss_jpeg", protocol, backbone="resnet_tiny")
    tuned = configure(ATTACKS, "iss_jpeg:base=full_finetune", protocol, backbone="resnet_tiny")
    ft = configure(ATTACKS, "full_finetune", protocol, backbone="resnet_tiny").plugin
    assert plain.label == "iss_jpeg" and tuned.label == "iss_jpeg(base=full_finetune)", (plain.label, tuned.label)
    assert tuned.plugin.paradigm() == ft, "the base is not the preset's full_finetune"
    assert (plain.plugin.epochs, plain.plugin.optimizer) == (6, "adamw"), "base scratch: not the preset's scratch"
    mobile = configure(ATTACKS, "cutout", protocol, backbone="mobilenet_tiny").plugin
    assert (mobile.lr, mobile.weight_decay) == (1e-2, 0.6), \
        "the base's per-backbone protocol (scratch@mobilenet_tiny) is not applied"
    sf = configure(ATTACKS, "mixup:base=sf_pretrain").plugin
    assert (sf.weights, sf.lr) == ("sf", 1e-3), "without a preset the base's own defaults apply"
    assert sf.zoo_sources() == frozenset({"sf"}) and plain.plugin.zoo_sources() == frozenset(), \
        "a countermeasure declares its base's zoo sources"
    with pytest.raises(UEBenchError, match=r"base='mixup' must be one of \('scratch'"):
        configure(ATTACKS, "cutout:base=mixup")
    with pytest.raises(UEBenchError, match="k=2 has no effect on base='full_finetune'"):
        configure(ATTACKS, "cutout:base=full_finetune,k=2")
    assert configure(ATTACKS, "cutout:base=frozen_shallow,k=2").plugin.paradigm().k == 2, "k does not reach the base"
    with pytest.raises(UEBenchError, match="unknown attack 'nope'"):
        configure(ATTACKS, "cutout:base=nope")
    with pytest.raises(UEBenchError, match="k=9 is out of range"):
        plan(preset_from_dict({"extends": "quick", "defenses": ["clean"], "attacks": ["cutout:base=frozen_shallow,k=9"],
                               "backbones": ["resnet_tiny"]}))


@pytest.mark.parametrize("spec", ["iss_jpeg:base=linear_probe", "cutout:base=linear_probe",
                                  "mixup:base=frozen_shallow", "iss_gray:base=frozen_shallow",
                                  "adv_training:base=full_finetune,steps=1",
                                  "ortho_projection:base=full_finetune,linear_epochs=1",
                                  "cutmix:base=sf_pretrain", "ueraser:base=sf_pretrain,repeats=2"])
def test_each_composes_with_a_pretrained_base(spec, tiny_train, tiny_test, ctx):
    cm = configure(ATTACKS, spec, {"*": FAST}).plugin
    fitted = cm.fit(tiny_train, "resnet_tiny", ctx)
    base = cm.paradigm()
    if cm.base == "linear_probe":
        assert fitted.trainable_parameters == sum(p.numel() for p in fitted.model.head.parameters()), \
            f"{spec}: trained more than the classifier"
    assert fitted.epochs == 1 and 0 <= fitted.train_accuracy <= 100, f"{spec}: {fitted}"
    assert fitted.model(to_float(tiny_test.images[:4])).shape == (4, tiny_train.num_classes), spec
    assert base.name == cm.base in BASES


def test_the_runner_matches_each_countermeasure_to_its_clean_reference(tmp_path):
    preset = preset_from_dict({
        "extends": "quick", "name": "cm-tiny", "dataset": {"train_size": 40, "test_size": 20, "source_size": 40},
        "defenses": ["clean", "random_noise:mode=class"],
        "attacks": ["full_finetune", "iss_gray", "iss_gray:base=full_finetune", "cutout:base=full_finetune"],
        "backbones": ["resnet_tiny"],
        "attack_protocol": {"*": {"epochs": 1, "batch_size": 16}},
        "zoo": {"supervised": {"epochs": 1, "batch_size": 16}}})
    cells = plan(preset)
    executor = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"), progress=False)
    summary = run_grid(cells, tmp_path, executor)
    assert not summary.failed, [r.error for r in summary.failed]
    with Store(tmp_path / "results.sqlite") as store:
        df = results_frame(store)
    clean = df[df["defense"] == "clean"].set_index("attack")["accuracy"]
    assert len(set(df[df["defense"] == "clean"]["key"])) == 4, "the clean cells of different attacks share a key"
    for row in df[df["defense"] != "clean"].itertuples():
        assert row.clean_accuracy == clean[row.attack], \
            f"{row.attack}: clean reference {row.clean_accuracy}, the clean cell under it reached {clean[row.attack]}"
    board = cells_board(tmp_path, cells, metadata_fallback=None)
    frames = countermeasure_frames(board, "resnet_tiny")
    assert list(frames) == ["scratch", "full_finetune"], list(frames)
    assert list(frames["full_finetune"].columns) == ["defense", "full_finetune", "iss_gray(base=full_finetune)",
                                                     "cutout(base=full_finetune)"], list(frames["full_finetune"])
    text = group_markdown(board)
    assert "countermeasures on full_finetune" in text and "iss_gray(base=full_finetune)" in text, text
    page = render(board)
    assert 'id="countermeasures-cm-tiny-resnet_tiny-full_finetune"' in page, "the site has no per-base table"
    assert "countermeasures on full_finetune" in page and "cutout(base=full_finetune)" in page
    worst = board.scores.set_index("defense").loc["random_noise(mode=class)"]
    accs = df[df["defense"] == "random_noise(mode=class)"]["accuracy"]
    assert worst["worst_accuracy"] == pytest.approx(accs.max()) and worst["cells_expected"] == 4, \
        "the worst case does not range over the countermeasures"
    assert isinstance(frames["scratch"], pd.DataFrame) and list(frames["scratch"].columns) == ["defense", "iss_gray"]
