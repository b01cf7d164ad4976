"""The peers lowbit is benchmarked against, on the same models in the same process.

* PyTorch PT2E static int8 (``torchao.quantization.pt2e`` with ``X86InductorQuantizer``): export,
  insert observers, calibrate, convert, then ``torch.compile`` with inductor freezing — the path
  PyTorch documents for int8 inference on x86 CPUs, and what lowbit's DESIGN measured at 3.37× on
  one UNet block.
* optimum-quanto W8A8 (``qint8`` weights and activations, calibrated), eager.

Both are optional (``pip install -e ".[bench]"``); a missing one is reported, not fatal.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._guards import GuardSkipping

__all__ = ["pt2e_int8", "quanto_w8a8"]


class EpsOnly(nn.Module):
    """``model(x, t).sample`` as a plain tensor function (what ``torch.export`` wants)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # float timesteps (same embedding): PT2E's observers cannot histogram an int64 tensor
        return self.unet(x, t.float()).sample


def pt2e_int8(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable:
    """PT2E static int8 + inductor (freezing). ``calib`` batches must have the sampling batch
    size (the exported graph is specialised to it). Returns a callable ``f(x, t) -> eps``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    x0, t0 = calib[0]
    exported = torch.export.export(EpsOnly(model).eval(), (x0, t0)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x, t in calib:
            prepared(x, t)
    converted = convert_pt2e(prepared)
    # the same harness as lowbit's compiled variants: guards checked once per kind of call
    compiled = GuardSkipping(converted, dynamic=False)

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # freezing on for every call, so that any recompilation is frozen too (an unfrozen graph
        # runs the int8 ops unfused and is no faster than fp32); t.clone() because the sampler's
        # t is a view at a new storage offset each step, which would force recompiles
        with torch._inductor.config.patch(freezing=True):
            return compiled(x, t.clone())

    with torch.no_grad():
        run(x0, t0)  # compile now
    return run


def quanto_w8a8(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """optimum-quanto qint8 weights + qint8 activations, calibrated on ``calib``, frozen."""
    from optimum.quanto import Calibration, freeze, qint8, quantize

    quantize(model, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration():
        for x, t in calib:
            model(x, t)
    freeze(model)
    return model
