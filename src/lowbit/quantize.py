"""The ``quantize`` and ``freeze`` verbs: plan → quantized model → stored form.

``quantize(model, "w4a8", calib=batches)`` resolves the plan on the model, swaps the chosen layers
for quantized ones (weight ranges set from the weights), and, when calibration inputs are given,
sets every activation range. ``freeze`` converts the simulated layers to stored form (codes and
scales only), which is what ``save`` writes and what fast kernels run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .calibration import calibrate
from .errors import PlanError
from .nn import QuantWeightLayer, apply_specs, quant_layers
from .plan import LayerSpec, Plan, as_plan


def quantize(model: nn.Module, plan: "Plan | str | LayerSpec" = "w8a8", calib: Iterable[Any] | None = None, *,
             forward_loop: Callable[[nn.Module], None] | None = None, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``plan`` is a :class:`Plan`, a recipe name (see ``lowbit.RECIPES``) or one :class:`LayerSpec`
    for every layer. Activation ranges are calibrated from ``calib`` (an iterable of model inputs)
    or ``forward_loop(model)``; without either, run :func:`lowbit.calibrate` before using a plan
    that quantizes activations. The plan is kept on the model as ``model.lowbit_plan``.
    """
    plan = as_plan(plan)
    if quant_layers(model):
        raise PlanError("this model is already quantized; start from the float model to apply another plan")
    specs = plan.resolve(model)
    if not specs:
        raise PlanError(f"plan {plan.name!r} matches no Linear, Conv2d or attention layer of this model;"
                        " check its include/exclude patterns against model.named_modules()")
    apply_specs(model, specs)
    model.lowbit_plan = plan
    if calib is not None or forward_loop is not None:
        calibrate(model, calib, forward_loop=forward_loop, progress=progress)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Convert every quantized layer to stored form (uint8 codes + scales; float weights dropped).
    Outputs are unchanged bit for bit. Returns the model."""
    for _, layer in quant_layers(model):
        if isinstance(layer, QuantWeightLayer):
            layer.freeze()
    return model
