"""Every registered defense honours the contract: shape, labels, budget, certificate, determinism, granularity.

Parametrized over ``DEFENSES.names()`` (plus the class-wise variants), so a new generator is tested
by these tests. Costly hyperparameters are shrunk by ``tiny_spec``; the data are 40 shapes images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pytest
import torch

from benchmark.config import configure
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Certificate, Context, Defense, Protected
from benchmark.presets import preset_from_dict
from benchmark.registry import DEFENSES
from benchmark.execute import LocalExecutor
from benchmark.plan import plan
from defenses._common import pgd, round_l2, round_linf
from defenses.ar import AutoregressivePerturbation, ar_signal, matching_filter, response
from defenses.cuda import class_filters
from defenses.lsp import make_classification
from defenses.ops import corner_colours, pixel_scores

# Generic shrinking of expensive fields, applied to whichever fields a plugin has.
TINY_FIELDS = {"surrogate_backbone": "resnet_tiny", "steps": 1, "epochs": 1, "train_steps": 2, "restarts": 1,
               "surrogate_epochs": 1, "max_rounds": 1, "eot": 1, "adv_steps": 1, "batch_size": 16,
               "surrogate_batch_size": 16, "pgd_steps": 1, "rounds": 1, "generator": "small"}
TINY_EXTRA = {"em": {"class_subset": 1.0}}
DETERMINISTIC = {"clean", "ops"}   # no randomness: the same bytes for every seed
PER_IMAGE_DRAWS = {"lsp", "ar"}    # class-wise processes that draw a fresh pattern for every image
NO_CERTIFICATE = {"clean", "random_noise"}  # no objective to reach (random_noise: sample mode; class mode has one)
SPECS = sorted(set(DEFENSES.names()) | {"em:mode=class", "random_noise:mode=class"})


def tiny_spec(spec: str) -> str:
    name, _, rest = spec.partition(":")
    cls = DEFENSES.get(name)
    have = {f.name for f in fields(cls)}
    given = {kv.split("=")[0] for kv in rest.split(",") if kv}
    over = {k: v for k, v in {**TINY_FIELDS, **TINY_EXTRA.get(name, {})}.items() if k in have and k not in given}
    items = [kv for kv in rest.split(",") if kv] + [f"{k}={v}" for k, v in over.items()]
    return f"{name}:{','.join(items)}" if items else name


_CACHE: dict[tuple, Protected] = {}


def protect(spec: str, data: ImageSet, seed: int, ctx: Context) -> Protected:
    """Protect ``data`` (memoized per spec, data set and seed: the tests share the outputs)."""
    key = (spec, data.name, seed)
    if key not in _CACHE:
        _CACHE[key] = configure(DEFENSES, tiny_spec(spec)).plugin.perturb(data, replace(ctx, seed=seed))
    return _CACHE[key]


def run(spec: str, data: ImageSet, seed: int, ctx: Context) -> ImageSet:
    """The protected images of ``protect``."""
    return protect(spec, data, seed, ctx).data


@pytest.fixture(scope="module")
def gray(tiny_train) -> ImageSet:
    """Constant mid-grey images with the tiny set's labels: any within-class difference is the method's."""
    return ImageSet(torch.full_like(tiny_train.images, 128), tiny_train.labels, tiny_train.classes, "gray")


def past_the_budget(clean: ImageSet, out: ImageSet, norm: str, budget: float) -> ImageSet:
    """``out`` with its first image changed just enough to leave the budget (``norm``, ``budget``)."""
    images = out.images.clone()
    base = clean.images[0].to(torch.int16).reshape(clean.image_shape[0], -1)  # C x (H*W)
    image = images[0].view(clean.image_shape[0], -1)
    if norm == "linf":  # one uint8 step past the budget, on the darkest value (it has room to go up)
        c, i = divmod(int(base.argmin()), base.shape[1])
        image[c, i] = int(base[c, i]) + math.floor(budget * 255 + 1e-6) + 1
    elif norm == "l0":  # one pixel position more than the budget, each mirrored (255 - v != v)
        k = int(budget) + 1
        image[:, :k] = (255 - base[:, :k]).to(torch.uint8)
    else:  # l2: the whole image mirrored
        image[:] = (255 - base).to(torch.uint8)
    return out.with_images(images)


@pytest.mark.parametrize("spec", SPECS)
def test_output_contract_and_budget(spec, tiny_train, ctx, monkeypatch):
    """A defense's release passes the engine's checks, and the engine rejects it once it leaves the
    declared budget or changes a label (``perturb`` is what guards the contract, so it is tested here)."""
    out = run(spec, tiny_train, 0, ctx)  # through perturb: within the contract, or it would have raised
    if spec != "clean":
        assert not torch.equal(out.images, tiny_train.images), f"{spec}: published the clean images unchanged"
    plugin = configure(DEFENSES, tiny_spec(spec)).plugin
    name, tm = type(plugin).name, plugin.threat_model()
    released = {"images": out}
    monkeypatch.setattr(type(plugin), "_perturb", lambda self, train, ctx: released["images"])
    if tm.norm != "none":
        released["images"] = past_the_budget(tiny_train, out, tm.norm, tm.budget)
        with pytest.raises(UEBenchError, match=rf"defense '{name}': {tm.norm} budget check failed"):
            plugin.perturb(tiny_train, ctx)
    released["images"] = ImageSet(out.images, (out.labels + 1) % out.num_classes, out.classes, out.name)
    with pytest.raises(UEBenchError, match=rf"defense '{name}': label check failed"):
        plugin.perturb(tiny_train, ctx)


@pytest.mark.parametrize("spec", SPECS)
def test_certificate(spec, tiny_train, ctx):
    """Every defense with an objective certifies it (measured on its released bytes); the others return None."""
    cert = protect(spec, tiny_train, 0, ctx).certificate
    if spec in NO_CERTIFICATE:
        assert cert is None, f"{spec} has no objective to certify, but returned {cert}"
        return
    assert isinstance(cert, Certificate) and cert.checks, f"{spec}: expected a certificate with checks, got {cert!r}"
    for check in cert.checks:
        assert check.op in ("<=", ">=") and isinstance(check.value, float), f"{spec}: malformed check {check}"
    assert cert.describe().startswith(("passed", "FAILED")), f"{spec}: describe() is {cert.describe()!r}"


@pytest.mark.parametrize("spec", SPECS)
def test_seeded(spec, tiny_train, ctx):
    a = protect(spec, tiny_train, 0, ctx)
    again = configure(DEFENSES, tiny_spec(spec)).plugin.perturb(tiny_train, replace(ctx, seed=0))
    assert torch.equal(a.data.images, again.data.images), f"{spec}: the same seed gave different bytes"
    assert a.certificate == again.certificate, f"{spec}: the same seed gave different certificates"
    a, b = a.data, run(spec, tiny_train, 1, ctx)
    if DEFENSES.get(spec.split(":")[0]).name in DETERMINISTIC:
        assert torch.equal(a.images, b.images), f"{spec}: a deterministic method changed with the seed"
    else:
        assert not torch.equal(a.images, b.images), f"{spec}: seeds 0 and 1 gave identical bytes"


@pytest.mark.parametrize("spec", [s for s in SPECS
                                  if configure(DEFENSES, tiny_spec(s)).plugin.threat_model().granularity == "class"])
def test_classwise(spec, gray, ctx):
    out = run(spec, gray, 0, ctx)
    delta = out.images.float() - gray.images.float()
    labels = gray.labels
    assert not torch.equal(out.images, gray.images), f"{spec}: no perturbation on grey images"
    name = DEFENSES.get(spec.split(":")[0]).name
    if name in PER_IMAGE_DRAWS:
        # a fresh draw per image, from a process of its class: differs within a class ...
        first = [int(torch.nonzero(labels == c)[0]) for c in labels.unique()]
        second = [int(torch.nonzero(labels == c)[1]) for c in labels.unique()]
        assert not torch.equal(delta[first], delta[second]), f"{spec}: expected per-image draws"
        if name == "lsp":  # ... but linearly separable: the nearest class mean of the patterns is the class
            means = torch.stack([delta[labels == c].mean(0) for c in range(gray.num_classes)]).flatten(1)
            pred = torch.cdist(delta.flatten(1), means).argmin(1)
            assert torch.equal(pred, labels), f"{spec}: patterns are not separable by class"
    else:
        for c in labels.unique().tolist():
            d = delta[labels == c]
            assert torch.equal(d, d[:1].expand_as(d)), f"{spec}: class {c} images got different perturbations"
        classes = [delta[labels == c][0] for c in labels.unique().tolist()]
        if name != "bait":  # bait's pattern is a class mean of G(x): identical grey inputs give identical means
            assert any(not torch.equal(classes[0], x) for x in classes[1:]), f"{spec}: every class got the same pattern"


@pytest.mark.parametrize("spec", SPECS)
def test_cached_protected_set_is_reused(spec, tmp_path, monkeypatch):
    """The executor builds a protected set once; a new run (fresh process memory) loads it from disk."""
    preset = preset_from_dict({"extends": "quick", "name": "tiny", "defenses": [tiny_spec(spec)],
                               "attacks": ["scratch"], "backbones": ["resnet_tiny"],
                               "dataset": {"train_size": 40, "test_size": 20, "source_size": 40},
                               "zoo": {"supervised": {"epochs": 1, "batch_size": 16}}})
    name = DEFENSES.get(spec.split(":")[0]).name
    cell = next(c for c in plan(preset) if c.defense.name == name)  # not the clean cell the plan adds first
    first, meta, _ = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"), progress=False).protected(cell)
    assert {"linf", "l2_mean", "psnr", "ssim", "seconds", "certificate"} <= set(meta), f"{spec}: missing from {meta}"
    assert (meta["certificate"] is None) == (spec in NO_CERTIFICATE), f"{spec}: certificate {meta['certificate']}"

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{spec}: the cached protected set was generated again")

    monkeypatch.setattr(type(cell.defense.plugin), "perturb", refuse)
    again, meta_again, seconds = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"),
                                               progress=False).protected(cell)
    assert torch.equal(first.images, again.images) and seconds == 0.0, f"{spec}: reloaded set differs"
    assert meta_again["certificate"] == meta["certificate"], f"{spec}: the cached certificate changed"


# ---------------------------------------------------------------- the engine rejects over-budget output

@pytest.mark.parametrize("norm, budget, change, allowed, measured", [
    ("linf", 8 / 255, lambda x: x // 2, "allowed 8/255", "measured [0-9.]+/255"),
    ("l2", 0.5, lambda x: x // 2, "allowed 0.5", "measured [0-9.]+"),
    ("l0", 1.0, lambda x: x // 2, "allowed 1", "measured [0-9]+"),
])
def test_engine_rejects_over_budget(norm, budget, change, allowed, measured, tiny_train):
    @dataclass(frozen=True)
    class OverBudget(Defense):
        eps: float = budget

        def _perturb(self, train, ctx):
            return train.with_images(change(train.images))

    OverBudget.name, OverBudget.norm, OverBudget.granularity = "over_budget", norm, "sample"
    message = rf"defense 'over_budget': {norm} budget check failed: {allowed}, {measured}"
    with pytest.raises(UEBenchError, match=message):
        OverBudget().perturb(tiny_train, Context())


@pytest.mark.parametrize("spec, pattern", [
    ("em:mode=bogus", "mode='bogus'"), ("em:steps=0", "steps=0"), ("em:surrogate=imagenet", "surrogate='imagenet'"),
    ("tap:restarts=0", "restarts=0"), ("tap:surrogate_backbone=nope", "unknown backbone 'nope'"),
    ("rem:eot=0", "eot=0"),
    ("lsp:patch_size=0", "patch_size=0"), ("ops:sparsity=0", "sparsity=0"), ("ar:crop=1", "crop=1"),
    ("cuda:kernel_size=2", "kernel_size=2"),
])
def test_bad_hyperparameters_are_rejected(spec, pattern):
    with pytest.raises(UEBenchError, match=pattern.replace("(", r"\(")):
        configure(DEFENSES, spec)


# ---------------------------------------------------------------- the maths, as pure functions

def test_rounding_stays_in_budget():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn((16, 3, 8, 8), generator=gen)
    r = round_l2(delta, 0.7)
    assert (r.flatten(1).norm(dim=1) <= 0.7 + 1e-6).all(), "round_l2 left the L2 budget"
    assert torch.allclose(r * 255, torch.round(r * 255), atol=1e-4), "round_l2 is not on the uint8 grid"
    assert (r.flatten(1).norm(dim=1) > 0.6).all(), "round_l2 threw away most of the perturbation"
    q = round_linf(delta * 0.1, 8 / 255)
    assert q.abs().max() * 255 <= 8 + 1e-4, "round_linf left the L-inf budget"


def test_pgd_minimizes_and_maximizes_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval().requires_grad_(False)
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 3, (8,))
    zero = torch.zeros_like(x)
    base = float(torch.nn.functional.cross_entropy(model(x), y))
    down, _ = pgd(model, x, y, zero, eps=0.1, step_size=0.02, steps=10, minimize=True)
    up, _ = pgd(model, x, y, zero, eps=0.1, step_size=0.02, steps=10, minimize=False)
    assert float(torch.nn.functional.cross_entropy(model(x + down), y)) < base, "min-PGD did not lower the loss"
    assert float(torch.nn.functional.cross_entropy(model(x + up), y)) > base, "max-PGD did not raise the loss"
    assert down.abs().max() <= 0.1 + 1e-6 and ((x + down) >= 0).all() and ((x + down) <= 1).all(), \
        "PGD left the L-inf ball or the [0, 1] box"


def test_make_classification_clusters_are_separable():
    gen = torch.Generator().manual_seed(0)
    points = make_classification([30, 30, 30], 12, 10.0, gen)
    assert [len(p) for p in points] == [30, 30, 30], "wrong number of points per class"
    means = torch.stack([p.mean(0) for p in points])
    assert torch.allclose(means.abs(), torch.full_like(means, 10.0), atol=4.0), \
        f"cluster means {means} are not near hypercube vertices at +-10"
    x, y = torch.cat(points), torch.arange(3).repeat_interleave(30)
    assert torch.equal(torch.cdist(x, means).argmin(1), y), "clusters are not separable by their means"


def test_ar_recursion_and_matching_filters():
    stable = torch.tensor([[[0.1561, -0.0710, 0.3743], [-0.1896, 0.0461, 0.6075], [0.0539, 0.0226, 0.0]]] * 3)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn((2, 3, 9, 8), generator=gen)
    naive = start.clone()
    for i in range(7):
        for j in range(6):
            naive[:, :, i + 2, j + 2] = (naive[:, :, i: i + 3, j: j + 3] * stable).sum((2, 3))
    assert torch.allclose(ar_signal(stable.expand(2, -1, -1, -1), start), naive, atol=1e-5), \
        "vectorized AR recursion differs from the pixel-by-pixel definition"
    ar = AutoregressivePerturbation()
    procs = ar.find_processes(3, 3, (16, 16), gen)
    sig = ar.signals(procs, (16, 16), gen)
    sig = sig / sig.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    own = [response(matching_filter(procs[k]), sig[k]) for k in range(3)]
    assert max(own) < 1e-3, f"a process's matching filter responds to its own signal: {own}"
    assert torch.isfinite(sig).all(), "AR signals contain NaN or infinity"


def test_cuda_filters_and_ops_scores():
    f = class_filters(10, 3, 0.3, 1.0, torch.Generator().manual_seed(0))
    assert ((f == 1.0).flatten(1).sum(1) == 1).all(), "each CUDA filter needs exactly one tap of 1.0"
    assert ((f[f != 1.0] >= 0) & (f[f != 1.0] <= 0.3)).all(), "CUDA weights must lie in [0, 0.3]"
    assert corner_colours(3).tolist()[5] == [1.0, 0.0, 1.0], "corner colours are not indexed MSB first"
    x = torch.rand((20, 3, 4, 4)) * 0.2 + 0.4   # mid-grey noise ...
    x[:, :, 1, 2] = 0.0                          # ... with one pixel always black: white is far and stable there
    scores = pixel_scores(x, corner_colours(3))
    best = int(scores.flatten().argmax())
    assert divmod(best, 16) == (7, 1 * 4 + 2), f"OPS should choose white at (1, 2), chose {divmod(best, 16)}"
    assert not math.isnan(float(scores.max())), "OPS scores contain NaN"
