"""``scratch``: train the whole backbone from random initialization on the protected data.

The setting every UE paper evaluates (e.g. Huang et al., ICLR 2021). Protocol defaults: SGD lr 0.1,
momentum 0.9, weight decay 5e-4, cosine, batch 128, random crop (pad 4) + flip, 60 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.models import create_model
from benchmark.plugins import Attack, Context, Fitted
from benchmark.registry import ATTACKS
from benchmark.training import Hooks, train, trainable_parameters


@ATTACKS.register("scratch")
@dataclass(frozen=True)
class Scratch(Attack):
    title = "Training from scratch"

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _fit(self, data: ImageSet, backbone: str, ctx: Context) -> Fitted:
        return self.fit_with(data, backbone, ctx, Hooks())

    def fit_with(self, data: ImageSet, backbone: str, ctx: Context, hooks: Hooks, desc: str = "scratch") -> Fitted:
        """Train from scratch with ``hooks`` in the loop (a countermeasure's; ``_fit`` passes none)."""
        torch.manual_seed(ctx.seed)
        model = create_model(backbone, data.num_classes, data.image_shape[-1], data.image_shape[0])
        result = train(model, data.images, data.labels, self.train_config(), device=ctx.device, seed=ctx.seed,
                       progress=ctx.progress, desc=f"{desc} {backbone}", batch_hook=hooks.batch_hook,
                       loss_fn=hooks.loss_fn)
        return Fitted(model, train_accuracy=result.train_accuracy, epochs=self.epochs,
                      trainable_parameters=trainable_parameters(model))
