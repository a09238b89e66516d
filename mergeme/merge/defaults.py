"""Default parameters of the trunk methods, as data: the one place the defaults are written.

``TRUNK_METHODS`` (the registry), ``MergeConfig`` and ``merge_trunk_tensor`` all read them
from here. This module imports nothing heavy, so the config schema can use it without torch.
"""

from __future__ import annotations

from typing import Literal

TiesAgreement = Literal["sum", "mean"]

# the MergeME paper's settings for its TIES and DARE trunks
PAPER_DENSITY = 0.8
PAPER_SCALE = 1 / 3
DEFAULT_TIES_AGREEMENT: TiesAgreement = "sum"  # the TIES paper sums agreeing entries
DEFAULT_SEED = 0

_SPARSE = {"density": PAPER_DENSITY, "scale": PAPER_SCALE}

# the parameters each method reads, with their defaults
TRUNK_METHOD_DEFAULTS: dict[str, dict[str, float | int | str]] = {
    "base": {},
    "average": {},
    "task_arithmetic": {"scale": PAPER_SCALE},
    "ties": {**_SPARSE, "ties_agreement": DEFAULT_TIES_AGREEMENT},
    "dare_linear": {**_SPARSE, "seed": DEFAULT_SEED},
    "dare_ties": {**_SPARSE, "ties_agreement": DEFAULT_TIES_AGREEMENT, "seed": DEFAULT_SEED},
}
