"""The benchmarked models: FP32/BF16 baselines, lowbit recipes run from their checkpoints, peers.

Every variant is built from the same float model and the same calibration inputs (recorded along
the FP32 model's own DDIM trajectory) and is returned as a ``Variant``: a callable
``f(x, t) -> eps`` plus what the benchmark table reports about it (checkpoint bytes, compute
paths, build seconds). lowbit variants go through the real user path — quantize, save, load the
packed checkpoint onto a meta-device model with ``compute="auto"`` — so the benchmark measures the
checkpoint a user ships, not the in-memory simulation.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .._guards import GuardSkipping
from ..io import fp32_safetensors_bytes, load, save
from ..quantize import quantize
from .peers import pt2e_int8, quanto_w8a8

__all__ = ["Variant", "build_variants"]


@dataclass
class Variant:
    """One row of the benchmark."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    checkpoint_bytes: int | None = None
    paths: dict[str, int] = field(default_factory=dict)  # compute path -> number of layers
    build_seconds: float = 0.0
    checkpoint: Path | None = None
    dtype: str = "fp32"  # activation dtype, for the memory measurement


def _eps(model: nn.Module, dtype: torch.dtype = torch.float32) -> Callable:
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # t.clone(): the sampler's t is a view into the scheduler's timestep table at a new
        # storage offset each step, and a compiled model would recompile for every offset
        out = model(x.to(dtype), t.clone())
        return (out.sample if hasattr(out, "sample") else out).float()
    return f


def _compiled(model: nn.Module, dtype=torch.float32) -> Callable:
    # compiled lazily by the benchmark's untimed first run, on exactly the timed shapes/strides;
    # guards checked once per kind of call, as lowbit.evaluate.runner samples (lowbit._guards)
    return _eps(GuardSkipping(model, dynamic=False), dtype)


def build_variants(float_model: Callable[[], nn.Module], meta_model: Callable[[], nn.Module],
                   calib: list, recipes: tuple[str, ...], peers: tuple[str, ...], workdir: Path,
                   log=print) -> list[Variant]:
    """All variants for one model. ``float_model()`` builds the FP32 model, ``meta_model()`` the
    same architecture on the meta device (for loading checkpoints).

    lowbit recipes run with bf16 activations between the quantized layers (``load(...,
    dtype=torch.bfloat16)``), eager and compiled; the first recipe also runs with float32
    activations, the configuration whose numerics equal the simulated model's."""
    from ..nn import quant_layers

    fp = float_model()
    fp_bytes = fp32_safetensors_bytes(fp)
    bf = copy.deepcopy(fp).to(torch.bfloat16)
    out = [Variant("fp32", _eps(fp), fp_bytes, {"fp32": 1}),
           Variant("bf16", _eps(bf, torch.bfloat16), fp_bytes // 2, {"bf16": 1}, dtype="bf16"),
           Variant("fp32 + compile", _compiled(copy.deepcopy(fp)), fp_bytes, {"fp32": 1}),
           Variant("bf16 + compile", _compiled(copy.deepcopy(bf), torch.bfloat16), fp_bytes // 2, {"bf16": 1})]
    for i, r in enumerate(recipes):
        tb = time.perf_counter()
        q = quantize(float_model(), r, calib, progress=False)
        path = save(q, Path(workdir) / f"{r}.safetensors")
        del q
        size = path.stat().st_size
        for dtype in ((torch.float32, torch.bfloat16) if i == 0 else (torch.bfloat16,)):
            with torch.device("meta"):
                fresh = meta_model()
            loaded = load(path, fresh, dtype=dtype)  # compute="auto": native kernels, codes released
            paths = dict(Counter(m.compute_path for _, m in quant_layers(loaded) if hasattr(m, "weight_shape")))
            tag = "fp32" if dtype == torch.float32 else "bf16"
            name = f"lowbit {r}" + (" (fp32 act.)" if tag == "fp32" else "")
            out.append(Variant(name, _eps(loaded, dtype), size, paths, time.perf_counter() - tb, checkpoint=path,
                               dtype=tag))
            log(f"  built {name}: {size:,} B, paths {paths}")
            if tag == "bf16":
                out.append(Variant(f"{name} + compile", _compiled(loaded, dtype), size, paths, checkpoint=path))
    for p in peers:
        tb = time.perf_counter()
        try:
            if p == "pt2e":
                fn = pt2e_int8(float_model(), calib)
                out.append(Variant("PT2E X86Inductor int8 + compile", fn, None, {"int8 (inductor)": 1},
                                   time.perf_counter() - tb))
            elif p == "quanto":
                m = quanto_w8a8(float_model(), calib)
                out.append(Variant("optimum-quanto W8A8", _eps(m), None, {"quanto": 1}, time.perf_counter() - tb))
        except ImportError as e:
            log(f"  peer {p} skipped: {e} (pip install -e '.[bench]')")
        except Exception as e:  # a peer failing must not hide lowbit's numbers; say why
            log(f"  peer {p} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
