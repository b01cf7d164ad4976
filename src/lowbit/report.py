"""Per-layer report: what each layer stores, how big it is, how accurate, and how it computes.

``report(model)`` lists every quantized layer (and totals over the whole model): name, type,
weight shape, weight format/granularity, activation format, fp32 bytes vs stored bytes (packed
codes + scales + zero-points + bias, exactly as ``lowbit.save`` writes them), weight SQNR and the
compute path. ``report_checkpoint(path)`` builds the same table from a checkpoint's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .formats import parse_optional
from .nn import QuantAttnProcessor, QuantWeightLayer, quant_layers
from .pack import packed_nbytes
from .quantizer import Granularity


@dataclass
class LayerRow:
    """One line of the report."""

    name: str
    type: str
    shape: tuple[int, ...]
    weight: str
    act: str
    fp32_bytes: int
    stored_bytes: int
    sqnr_db: float | None
    path: str


# A per-tensor activation quantizer stores scale + zero-point (fp32 each) + a 1-byte flag.
_ACT_QUANT_BYTES = 9


def _weight_bytes(shape, spec, has_bias: bool) -> tuple[int, int]:
    numel = int(torch.Size(shape).numel())
    bias = 4 * shape[0] if has_bias else 0
    fp32 = 4 * numel + bias
    act = _ACT_QUANT_BYTES if parse_optional(spec["act"]) else 0
    fmt = parse_optional(spec["weight"])
    if fmt is None:
        return fp32, fp32 + act
    scales = int(torch.Size(Granularity.parse(spec["weight_granularity"]).scale_shape(tuple(shape))).numel())
    # packed codes + a scale per group (fp32) + the 1-byte "calibrated" flag, and a zero-point
    # per group (fp32) for asymmetric formats only (io.save drops symmetric weights' zeros)
    per_group = 4 if fmt.symmetric else 8
    return fp32, packed_nbytes(numel, fmt.bits) + per_group * scales + 1 + bias + act


def _act_name(spec: dict) -> str:
    a = parse_optional(spec["act"])
    return a.name if a else "fp32"


def _row_from_meta(name: str, d: dict, path: str) -> LayerRow:
    spec = d["spec"]
    if d["type"] == QuantAttnProcessor.__name__:
        return LayerRow(name, "attn-matmul", (), "-", _act_name(spec), 0, 4 * _ACT_QUANT_BYTES, None, path)
    shape = tuple(d["weight_shape"])
    fp32, stored = _weight_bytes(shape, spec, d.get("bias", True))
    w = parse_optional(spec["weight"])
    wname = f"{w.name}/{Granularity.parse(spec['weight_granularity']).name}" if w else "fp32"
    typ = d["type"].removeprefix("Quant")
    return LayerRow(name, typ, shape, wname, _act_name(spec), fp32, stored, d.get("weight_sqnr_db"), path)


def report(model: nn.Module) -> list[LayerRow]:
    """Rows for every quantized layer of ``model`` plus one row for everything else."""
    from .io import _layer_meta  # the same metadata save() writes, so the two reports agree

    rows = []
    quant_params = set()
    for name, layer in quant_layers(model):
        if isinstance(layer, QuantWeightLayer):
            quant_params.update(id(p) for p in layer.parameters(recurse=False))
        rows.append(_row_from_meta(name, _layer_meta(layer), layer.compute_path))
    rest = sum(4 * p.numel() for n, p in model.named_parameters()
               if id(p) not in quant_params and not _is_quantizer_param(n))
    rows.append(LayerRow("(other: kept in float)", "-", (), "fp32", "-", rest, rest, None, "float"))
    return rows


def _is_quantizer_param(name: str) -> bool:
    return any(part in name for part in ("weight_quant.", "input_quant.", "processor."))


def report_checkpoint(path: "str | Path") -> list[LayerRow]:
    """Rows for a saved checkpoint, from its metadata and tensors (no model code needed)."""
    from .io import read_checkpoint

    meta, tensors = read_checkpoint(path)
    layers = json.loads(meta["layers"])
    rows = [_row_from_meta(n, d, "emulated") for n, d in layers.items()]
    owned = tuple(f"{n}.processor." if d["type"] == QuantAttnProcessor.__name__ else f"{n}." for n, d in layers.items())
    rest = sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith(owned))
    rows.append(LayerRow("(other: kept in float)", "-", (), "fp32", "-", rest, rest, None, "float"))
    return rows


def format_report(rows: list[LayerRow], max_rows: int | None = None) -> str:
    """A plain-text table with totals; ``max_rows`` elides the middle of long tables."""
    head = f"{'layer':<44} {'type':<11} {'shape':<18} {'weight':<16} {'act':<9} {'fp32 B':>10} {'stored B':>10} {'SQNR dB':>8}  path"
    lines = [head, "-" * len(head)]
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[: max_rows - 1] + [None] + rows[-1:]
    for r in shown:
        if r is None:
            lines.append(f"  ... {len(rows) - max_rows} more layers ...")
            continue
        sq = "" if r.sqnr_db is None else ("inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}")
        shape = "x".join(map(str, r.shape)) or "-"
        lines.append(f"{r.name[-44:]:<44} {r.type:<11} {shape:<18} {r.weight:<16} {r.act:<9} {r.fp32_bytes:>10,} "
                     f"{r.stored_bytes:>10,} {sq:>8}  {r.path}")
    fp32 = sum(r.fp32_bytes for r in rows)
    stored = sum(r.stored_bytes for r in rows)
    lines.append("-" * len(head))
    ratio = stored / fp32 if fp32 else float("nan")
    nq = sum(1 for r in rows if r.type not in ("-",))
    lines.append(f"{nq} quantized layers; weights {fp32:,} B fp32 -> {stored:,} B stored ({ratio:.3f}x)")
    return "\n".join(lines)
