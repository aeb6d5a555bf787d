"""Backbones through timm, wrapped so that every model takes images in [0, 1].

``create_model(name, num_classes, image_size)`` builds a registered backbone (random weights; the zoo
loads pretrained ones). ``Classifier`` adds input normalization, ordered *stages* (stem, body stages,
head; read from timm's own ``group_matcher``) and stage freezing that keeps frozen modules in eval mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import timm
import torch
from timm.models._manipulate import group_parameters
from torch import nn

from benchmark.errors import UEBenchError
from benchmark.registry import Registry

CIFAR_MEAN, CIFAR_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class BackboneSpec:
    """A network family and size: a timm architecture plus overrides."""

    name: str
    family: str                      # resnet | mobilenet | vit | convnext
    timm_name: str                   # timm architecture (and the hub weights for source 'timm')
    kwargs: dict = field(default_factory=dict, hash=False)
    small_stem: bool = True          # 3x3 stride-1 stem without max-pool, for 32x32 inputs (resnet)
    description: str = ""
    conv_stem: bool = False          # vit: 3x3 stride-2 convolutions in place of the patchify layer (ViT_C)

    def __post_init__(self) -> None:
        patch = self.kwargs.get("patch_size", 16)
        if self.conv_stem and (self.family != "vit" or patch < 2 or patch & (patch - 1)):
            raise UEBenchError(f"backbone {self.name!r}: conv_stem needs a vit with a power-of-two patch_size, "
                               f"got family {self.family!r}, patch_size {patch!r}")

    def key(self) -> dict:
        key = {"name": self.name, "timm_name": self.timm_name, "kwargs": self.kwargs, "small_stem": self.small_stem}
        return {**key, "conv_stem": True} if self.conv_stem else key


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
register_backbone = BACKBONES.add  # register_backbone(spec): under spec.name; a duplicate name fails


register_backbone(BackboneSpec(
    "resnet_tiny", "resnet", "resnet18", {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
    description="ResNet, 4 stages of one basic block, 16-128 channels (0.3M params); CPU-fast"))
register_backbone(BackboneSpec(
    "resnet18", "resnet", "resnet18", {}, description="ResNet-18 with a CIFAR stem (11M params)"))
register_backbone(BackboneSpec(
    "resnet18_in", "resnet", "resnet18.tv_in1k", {}, small_stem=False,
    description="ResNet-18 with the ImageNet stem, as BAIT fine-tunes it at 32x32 (timm/torchvision weights)"))
register_backbone(BackboneSpec(
    "mobilenet_tiny", "mobilenet", "mobilenetv3_small_050", {},
    description="MobileNetV3-Small 0.5x with a stride-1 stem for 32x32 inputs (0.6M params); CPU-fast"))
register_backbone(BackboneSpec(
    "mobilenet", "mobilenet", "mobilenetv3_large_100", {},
    description="MobileNetV3-Large 1.0x with a stride-1 stem for small images (4.2M params)"))
register_backbone(BackboneSpec(
    "vit_tiny", "vit", "vit_tiny_patch16_224",
    {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0},
    description="ViT, patch 4, width 96, depth 4 (0.3M params); CPU-fast, but stays at chance on the glyph "
                "pool (docs/methods.md)"))
register_backbone(BackboneSpec(
    "vit_tiny_conv", "vit", "vit_tiny_patch16_224",
    {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}, conv_stem=True,
    description="vit_tiny with a convolutional stem in place of patch 4 (Xiao et al. 2021); learns the glyph "
                "pool where the patchify stem stays at chance (docs/methods.md); CPU-fast"))
register_backbone(BackboneSpec(
    "vit_tiny_p4", "vit", "vit_tiny_patch16_224", {"patch_size": 4},
    description="ViT-Tiny (width 192, depth 12) with patch 4 for small images (5.4M params)"))
register_backbone(BackboneSpec(
    "convnext_tiny", "convnext", "convnext_atto",
    {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "patch_size": 1},
    description="ConvNeXt, 4 stages of one block, 16-128 channels, stride-1 stem; stays at chance on the glyph "
                "pool in a CPU budget (docs/methods.md)"))
register_backbone(BackboneSpec(
    "convnext_atto", "convnext", "convnext_atto", {"patch_size": 1},
    description="ConvNeXt-Atto (3.4M params) with a stride-1 stem for small images"))


def get_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name``; an unknown name fails with the valid names."""
    return BACKBONES.get(name)


class Classifier(nn.Module):
    """A timm network behind input normalization, with ordered stages and stage freezing."""

    def __init__(self, net: nn.Module, spec: BackboneSpec, mean=CIFAR_MEAN, std=CIFAR_STD) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.normalize = Normalize(torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))
        self._frozen: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier layer."""
        net = self.net
        return net.forward_head(net.forward_features(self.normalize(x)), pre_logits=True)

    @property
    def head(self) -> nn.Module:
        return self.net.get_classifier()

    def reset_head(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)

    def stages(self) -> list[list[str]]:
        """Parameter names per stage, in order: stem, body stages..., head (incl. final norm)."""
        groups = group_parameters(self.net, self.net.group_matcher(coarse=True))
        return [list(names) for _, names in sorted(groups.items())]

    @property
    def num_body_stages(self) -> int:
        return len(self.stages()) - 2

    def freeze(self, parameter_names: set[str]) -> None:
        """Freeze these parameters (``requires_grad=False``); their modules stay in eval mode."""
        params = dict(self.net.named_parameters())
        unknown = parameter_names - params.keys()
        if unknown:
            raise UEBenchError(f"{self.spec.name}: no parameters named {sorted(unknown)[:3]}")
        for n in parameter_names:
            params[n].requires_grad_(False)
        self._frozen |= {n.rsplit(".", 1)[0] if "." in n else "" for n in parameter_names}
        self.train(self.training)

    def freeze_stages(self, k: int) -> None:
        """Freeze the stem and the first ``k`` body stages (k=0 freezes nothing)."""
        stages = self.stages()
        if not 0 <= k <= len(stages) - 2:
            raise UEBenchError(f"{self.spec.name} has {len(stages) - 2} body stages; k={k} is out of range")
        if k:
            self.freeze({n for group in stages[: k + 1] for n in group})

    def freeze_all_but_head(self) -> None:
        head = {id(p) for p in self.head.parameters()}
        self.freeze({n for n, p in self.net.named_parameters() if id(p) not in head})

    def split(self, k: int) -> tuple[nn.Module, nn.Module]:
        """The network cut after its stem and first ``k`` body stages (those ``freeze_stages(k)`` freezes):
        ``(prefix, suffix)``, two modules sharing this model's parameters, with ``suffix(prefix(x))`` equal
        to ``self(x)``. ``prefix`` takes images in [0, 1]. ``k = 0`` cuts after the stem."""
        n = self.num_body_stages
        if not 0 <= k <= n:
            raise UEBenchError(f"{self.spec.name} has {n} body stages; k={k} is out of range")
        net, family = self.net, self.spec.family
        if family == "resnet":
            stem = [net.conv1, net.bn1, net.act1, net.maxpool]
            stages = [net.layer1, net.layer2, net.layer3, net.layer4]
            neck: list[nn.Module] = []
            head = [net.global_pool, net.fc]
        elif family == "mobilenet":
            stem, stages, neck = [net.conv_stem, net.bn1], list(net.blocks), []
            head = [net.global_pool, net.conv_head, net.norm_head, net.act2, net.flatten, net.classifier]
        elif family == "convnext":
            stem, stages, neck, head = [net.stem], list(net.stages), [net.norm_pre], [net.head]
        elif family == "vit":
            stem = [_VitEmbed(net)]
            stages, neck, head = list(net.blocks), [net.norm], [net.fc_norm, net.head_drop, net.head]
        else:
            raise UEBenchError(f"{self.spec.name}: no split for family {family!r}")
        if len(stages) != n:
            raise UEBenchError(f"{self.spec.name}: {len(stages)} stage modules, but {n} parameter stages")
        prefix = nn.Sequential(self.normalize, *stem, *stages[:k])
        suffix = nn.Sequential(*stages[k:], *neck, _Head(net, head))
        return prefix, suffix

    def frozen_parameter_names(self) -> set[str]:
        return {n for n, p in self.net.named_parameters() if not p.requires_grad}

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self._frozen:
            for name, module in self.net.named_modules():
                if name in self._frozen:
                    module.eval()
        return self


class Normalize(nn.Module):
    """The input normalization of a ``Classifier`` (also the first layer of its ``split`` prefix)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _VitEmbed(nn.Module):
    """A ViT's stem as one module: patch embedding, position embedding (and class token), patch drop,
    pre-norm."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList([net.patch_embed, net.patch_drop, net.norm_pre])
        # the network's tokens and position embedding (stem parameters): registered here too, used by _pos_embed
        self.tokens = nn.ParameterList([p for p in (net.cls_token, net.reg_token, net.pos_embed) if p is not None])
        self.add_positions = net._pos_embed  # a bound method: class token and position embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch_embed, patch_drop, norm_pre = self.parts
        return norm_pre(patch_drop(self.add_positions(patch_embed(x))))


class _Head(nn.Module):
    """A timm network's ``forward_head`` as a module (the last layer of a ``split`` suffix); ``modules``
    are the layers it uses, registered here so that the suffix owns their parameters."""

    def __init__(self, net: nn.Module, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        object.__setattr__(self, "_net", net)  # not a submodule: the suffix owns the head's layers only

    def train(self, mode: bool = True) -> _Head:
        super().train(mode)
        self._net.training = mode  # forward_head reads the network's own flag (dropout)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net.forward_head(x)


def create_model(name: str, num_classes: int, image_size: int = 32, in_chans: int = 3) -> Classifier:
    """A registered backbone with random weights and a ``num_classes``-way head."""
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    if spec.family == "vit":
        kwargs["img_size"] = image_size
    net = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if spec.family == "resnet" and spec.small_stem:
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if spec.family == "mobilenet" and spec.small_stem:
        net.conv_stem.stride = (1, 1)
    if spec.conv_stem:
        net.patch_embed.proj = conv_stem(in_chans, net.patch_embed.proj.out_channels, spec.kwargs["patch_size"])
    if spec.small_stem:
        return Classifier(net, spec)
    cfg = net.pretrained_cfg or {}
    return Classifier(net, spec, cfg.get("mean", CIFAR_MEAN), cfg.get("std", CIFAR_STD))


def conv_stem(in_chans: int, width: int, patch_size: int) -> nn.Sequential:
    """The convolutional stem of "Early Convolutions Help Transformers See Better" (Xiao et al., NeurIPS
    2021): log2(patch_size) 3x3 stride-2 convolutions with batch norm and ReLU, widths doubling up to
    ``width / 2``, then a 1x1 convolution to ``width``; the same token grid as a patchify layer."""
    layers: list[nn.Module] = []
    steps = patch_size.bit_length() - 1
    chans = in_chans
    for i in range(steps):
        out = max(1, width >> (steps - i))
        layers += [nn.Conv2d(chans, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        chans = out
    return nn.Sequential(*layers, nn.Conv2d(chans, width, 1))


@functools.lru_cache(maxsize=None)
def body_stages(name: str) -> int:
    """How many body stages backbone ``name`` has (``Classifier.num_body_stages``), counted on a build on
    the meta device: no memory and no weights, so a plan can check a freezing depth before any work."""
    with torch.device("meta"):
        return create_model(name, num_classes=2).num_body_stages
