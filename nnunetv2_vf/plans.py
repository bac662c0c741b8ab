"""Reading nnU-Net plans dicts the way nnU-Net itself does."""
from __future__ import annotations

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

__all__ = ["effective_configuration"]


def effective_configuration(plans: dict, configuration: str) -> dict:
    """The configuration with ``inherits_from`` resolved (nnU-Net's own resolution, a copy): the values training
    will see, e.g. a ``3d_cascade_fullres`` patch that only its parent states."""
    if configuration not in plans["configurations"]:
        raise KeyError(f"configuration {configuration!r} not in the plans (have {sorted(plans['configurations'])})")
    return PlansManager(plans).get_configuration(configuration).configuration
