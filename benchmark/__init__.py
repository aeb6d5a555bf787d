"""uebench: unlearnable examples against pretrained, frozen, probed and fine-tuned victims.

The engine: registries, data sets, backbones, the training loop, planning, execution, reports and the store.
"""

__version__ = "0.1.0"

# Bump when a change to the engine alters what a cell computes; every cached cell is then recomputed.
PROTOCOL_VERSION = 1
