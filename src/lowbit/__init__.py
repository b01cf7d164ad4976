"""lowbit: low-bit post-training quantization of diffusion models, for real.

The public verbs, one per step of the data path::

    model = lowbit.quantize(model, "w4a8", calib=batches)   # plan -> quantized layers -> ranges
    lowbit.save(model, "unet-w4a8.safetensors")              # packed codes + scales + plan
    model = lowbit.load("unet-w4a8.safetensors", float_model) # native int8 / bf16 kernels
    print(lowbit.format_report(lowbit.report(model)))       # which path every layer runs

``lowbit.set_compute(model, "auto" | "int8" | "bf16" | "emulated")`` switches the compute path
of a quantized model in memory; ``load(..., compute="emulated")`` is bit-identical to the
simulated model.

Number formats are data (``lowbit.formats.parse("fp4_e2m1")``); recipes are named plans
(``lowbit.RECIPES``).
"""

from . import formats
from .calibration import calibrate
from .errors import CalibrationError, CheckpointError, DataError, EvaluationError, FormatError, LowbitError, PlanError
from .formats import QFormat, parse
from .io import load, read_checkpoint, save
from .kernels import set_compute
from .nn import QuantAttnProcessor, QuantConv2d, QuantEmbedding, QuantLinear, quant_layers
from .plan import DEFAULT_EXCLUDE, RECIPES, LayerSpec, Plan, Rule, recipe
from .quantize import freeze, quantize
from .quantizer import Granularity, Quantizer
from .report import format_report, report, report_checkpoint

__version__ = "0.1.0"

__all__ = [
    "formats", "parse", "QFormat", "Quantizer", "Granularity",
    "quantize", "calibrate", "freeze", "save", "load", "read_checkpoint", "set_compute",
    "report", "report_checkpoint", "format_report",
    "LayerSpec", "Plan", "Rule", "recipe", "RECIPES", "DEFAULT_EXCLUDE",
    "QuantLinear", "QuantConv2d", "QuantEmbedding", "QuantAttnProcessor", "quant_layers",
    "LowbitError", "FormatError", "PlanError", "CalibrationError", "CheckpointError", "EvaluationError", "DataError",
]
