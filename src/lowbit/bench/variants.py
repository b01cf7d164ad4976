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
    note: str = ""
    checkpoint: Path | None = None


def _eps(model: nn.Module, dtype: torch.dtype = torch.float32) -> Callable:
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x.to(dtype), t)
        return (out.sample if hasattr(out, "sample") else out).float()
    return f


def _compiled(model: nn.Module, dtype=torch.float32) -> Callable:
    # compiled lazily by the benchmark's untimed first run, on exactly the timed shapes/strides
    return _eps(torch.compile(model, dynamic=False), dtype)


def build_variants(float_model: Callable[[], nn.Module], meta_model: Callable[[], nn.Module],
                   calib: list, recipes: tuple[str, ...], peers: tuple[str, ...], workdir: Path,
                   compile_lowbit: bool = True, log=print) -> list[Variant]:
    """All variants for one model. ``float_model()`` builds the FP32 model, ``meta_model()`` the
    same architecture on the meta device (for loading checkpoints)."""
    fp = float_model()
    fp_bytes = fp32_safetensors_bytes(fp)
    out = [Variant("fp32", _eps(fp), fp_bytes, {"fp32": 1}),
           Variant("bf16", _eps(copy.deepcopy(fp).to(torch.bfloat16), torch.bfloat16), fp_bytes // 2, {"bf16": 1})]
    tb = time.perf_counter()
    out.append(Variant("fp32 + compile", _compiled(copy.deepcopy(fp)), fp_bytes, {"fp32": 1},
                       time.perf_counter() - tb))
    for r in recipes:
        tb = time.perf_counter()
        q = quantize(float_model(), r, calib, progress=False)
        path = save(q, Path(workdir) / f"{r}.safetensors")
        del q
        with torch.device("meta"):
            fresh = meta_model()
        loaded = load(path, fresh)  # compute="auto": native kernels, codes released
        from ..nn import quant_layers  # noqa: PLC0415 (light import; keeps module import cheap)

        paths = Counter(m.compute_path for _, m in quant_layers(loaded) if hasattr(m, "weight_shape"))
        size = path.stat().st_size
        out.append(Variant(f"lowbit {r}", _eps(loaded), size, dict(paths), time.perf_counter() - tb, checkpoint=path))
        log(f"  built lowbit {r}: {size:,} B, paths {dict(paths)}")
        if compile_lowbit:
            tc = time.perf_counter()
            out.append(Variant(f"lowbit {r} + compile", _compiled(loaded), size, dict(paths),
                               time.perf_counter() - tc, checkpoint=path))
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
