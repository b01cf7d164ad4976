"""Packed low-bit checkpoints: ``save`` and ``load``.

A lowbit checkpoint is one safetensors file. Each quantized weight is stored as its integer codes
packed densely at the format's bit width (``lowbit.pack``: two 4-bit codes per byte, 3-bit codes
as a bit stream, …) plus its scales and, for asymmetric formats, zero-points (a symmetric format's
are all 0 and ``load`` recreates them); everything else (biases, norms, layers kept
in FP, activation ranges, and the non-persistent buffers a state dict leaves out, such as DiT's
positional table) is stored as is. The JSON metadata holds the plan, each quantized layer's
spec, shape and bit width, a signature of the float architecture (to refuse the wrong model) and a
SHA-256 over metadata and tensors (to refuse truncated or tampered files). No pickle anywhere.

``load`` swaps empty stored-form layers into the float model (ideally built on the meta device,
so no fp32 weight is ever allocated) and assigns the tensors, giving bit-identical outputs.
Writes are atomic: temp file in the same directory, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._platform import resolve_device, trim_heap
from .errors import CheckpointError, LowbitError
from .formats import parse_optional
from .nn import QuantAttnProcessor, QuantModule, QuantWeightLayer, apply_specs, quant_layers
from .pack import pack, unpack
from .plan import LayerSpec, Plan
from .quantizer import Quantizer

FORMAT_VERSION = "1"
_PACKED = ".weight_codes.packed"
_ZERO = ".weight_quant.zero"


def fp_signature(model: nn.Module) -> dict[str, list[int]]:
    """Key → shape of the *float* model's state dict, also when ``model`` is quantized: quantizer
    state is skipped and stored codes count as the weight they replace."""
    skip = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (Quantizer, QuantAttnProcessor)))
    sig = {}
    for k, v in model.state_dict().items():
        if skip and k.startswith(skip):
            continue
        sig[k.removesuffix("_codes") if k.endswith(".weight_codes") else k] = list(v.shape)
    return sig


def nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's non-persistent buffers by state-dict-style key. A state dict leaves them out
    (the module recomputes them in ``__init__``), but a model built on the meta device never
    computes them: DiT's positional embedding (``pos_embed.pos_embed``) is one. Checkpoints store
    them so that such models load onto the meta device too (DiT-S-like: 0.4 MB)."""
    return {f"{mn}.{bn}" if mn else bn: m._buffers[bn] for mn, m in model.named_modules()
            for bn in sorted(m._non_persistent_buffers_set) if m._buffers.get(bn) is not None}


def _restore_nonpersistent(model: nn.Module, keys: list, tensors: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for key in keys:
        mn, _, bn = key.rpartition(".")
        m = modules.get(mn)
        if key not in tensors or m is None or bn not in m._non_persistent_buffers_set:
            raise CheckpointError(f"checkpoint's non-persistent buffer {key!r} does not fit this model; pass the"
                                  " architecture it was quantized from")
        m._buffers[bn] = tensors.pop(key)


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Size of ``model`` saved as plain float safetensors: the reference for checkpoint ratios."""
    return len(safetensors.torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}))


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: "str | Path", data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _layer_meta(layer: QuantModule) -> dict:
    d = {"type": type(layer).__name__, "spec": asdict(layer.spec)}
    if isinstance(layer, QuantWeightLayer):
        fmt = parse_optional(layer.spec.weight)
        d.update(weight_shape=list(layer.weight_shape), bits=fmt.bits if fmt else None,
                 weight_sqnr_db=layer.weight_sqnr_db, bias=layer.bias is not None)
    return d


def save(model: nn.Module, path: "str | Path", *, metadata: dict[str, str] | None = None) -> Path:
    """Write a quantized model (simulated or stored form) as a packed safetensors checkpoint.

    ``metadata`` adds string entries (stored under ``user.<key>``). Returns the path.
    """
    layers = quant_layers(model)
    if not layers:
        raise CheckpointError("this model has no quantized layers: run lowbit.quantize(model, recipe) before saving")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[k] = v.detach()
    extra = nonpersistent_buffers(model)
    tensors.update({k: v.detach() for k, v in extra.items()})
    for name, layer in layers:
        if isinstance(layer, QuantWeightLayer) and layer.weight_quant.enabled:
            tensors.pop(f"{name}.weight", None)
            tensors.pop(f"{name}.weight_codes", None)
            tensors[name + _PACKED] = pack(layer.weight_codes_now().cpu(), layer.weight_quant.fmt.bits)
            wq = layer.weight_quant
            if wq.fmt.symmetric and not bool(torch.any(wq.zero != 0)):
                # symmetric weights' zero-points are all 0 (as many bytes as the scales): not stored
                tensors.pop(f"{name}{_ZERO}", None)
    seen: set[int] = set()
    for k, v in tensors.items():  # safetensors refuses shared storage (tied weights): copy those
        v = v.cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    plan = getattr(model, "lowbit_plan", None)
    meta = {
        "lowbit_format": FORMAT_VERSION,
        "plan": plan.to_json() if isinstance(plan, Plan) else "null",
        "layers": json.dumps({n: _layer_meta(m) for n, m in layers}),
        "arch": json.dumps(fp_signature(model)),
    }
    if extra:  # absent when there are none: such checkpoints stay byte-identical to earlier ones
        meta["nonpersistent"] = json.dumps(sorted(extra))
    meta.update({f"user.{k}": str(v) for k, v in (metadata or {}).items()})
    meta["checksum"] = _digest(meta, tensors)
    atomic_write(path, safetensors.torch.save(tensors, metadata=meta))
    return Path(path)


def read_safetensors(path: "str | Path", what: str, fix: str,
                     tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of any safetensors file we ship or write; a missing or unreadable file
    raises one CheckpointError naming ``what`` it should have been and ``fix``. ``tensors=False``
    reads the header only (the tensors dict is then empty)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found at {path}; {fix}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types for damaged headers/offsets
        msg = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"cannot read {what} {path}: the file is damaged (truncated or not a safetensors"
                              f" file: {msg}); {fix}") from None
    return meta, out


_CKPT_FIX = "check the path, or re-save it with lowbit.save (it writes .safetensors files)"


def _check_lowbit(meta: dict[str, str], path: "str | Path") -> None:
    if "lowbit_format" not in meta:
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no lowbit metadata); quantize and save it with lowbit first")
    if meta["lowbit_format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta['lowbit_format']!r}; this lowbit reads {FORMAT_VERSION!r}")


def read_checkpoint(path: "str | Path") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a lowbit checkpoint, integrity-checked (no model needed)."""
    meta, tensors = read_safetensors(path, "lowbit checkpoint", _CKPT_FIX)
    _check_lowbit(meta, path)
    if meta.get("checksum") != _digest(meta, tensors):
        raise CheckpointError(
            f"{path} was modified or corrupted after saving (checksum mismatch); re-save it from the source model"
        )
    return meta, tensors


def read_metadata(path: "str | Path") -> dict[str, str]:
    """A lowbit checkpoint's metadata, from the file's header alone (no tensor is read; the
    checksum is checked when the checkpoint is loaded)."""
    meta, _ = read_safetensors(path, "lowbit checkpoint", _CKPT_FIX, tensors=False)
    _check_lowbit(meta, path)
    return meta


def _json(meta: dict[str, str], key: str):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint metadata entry {key!r} is missing or damaged; re-save the checkpoint") from None


def _check_arch(expected: dict, model: nn.Module) -> None:
    got = fp_signature(model)
    for k, shape in expected.items():
        if k not in got:
            raise CheckpointError(f"checkpoint does not fit this model: it has {k!r}, which the model lacks;"
                                  " pass the architecture the checkpoint was quantized from")
        if list(got[k]) != list(shape):
            raise CheckpointError(f"checkpoint does not fit this model: {k!r} has shape {shape} in the checkpoint but"
                                  f" {got[k]} in the model; pass the architecture it was quantized from")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint does not fit this model: the model has {extra[0]!r}, which the checkpoint"
                              " lacks; pass the architecture it was quantized from")




def load(path: "str | Path", model: nn.Module | None = None, *, compute: str = "auto",
         dtype: torch.dtype = torch.float32, device: "str | torch.device | None" = None) -> nn.Module:
    """Load a lowbit checkpoint into ``model``, the *float* architecture it was quantized from.

    Build the model under ``torch.device("meta")`` to avoid allocating any fp32 weight; every
    tensor is then assigned from the file. Returns the quantized model (stored form, eval mode).
    ``model=None`` rebuilds the architecture the checkpoint records (checkpoints written by
    ``lowbit quantize``/``lowbit demo``: the bundled model, a diffusers ``UNet2DModel`` config or a
    built-in toy; :func:`lowbit.zoo.local.build_from_metadata`), on the meta device.

    ``compute`` installs each layer's kernel (:func:`lowbit.kernels.set_compute`): ``"auto"``
    runs native int8 / bf16 wherever a layer's formats allow, and then keeps only the kernel's
    copy of those weights (packed int4 becomes int8 in memory, never fp32); such a model runs but
    cannot be saved again. Kernels are built layer by layer as the codes are unpacked, so loading
    never holds more than the kernels, the file's packed bytes and one layer's codes. ``"emulated"`` keeps the codes and computes exactly like the simulated
    model. ``dtype=torch.bfloat16`` runs the activations between quantized layers in bf16 (see
    :func:`lowbit.kernels.set_compute`; feed bf16 inputs).

    ``device="cuda"`` moves the loaded model to the GPU and installs the kernels there (``torch._int_mm``
    W8A8 Linears and convolutions, ``torch._scaled_mm`` FP8 Linears, bf16 grouped convolutions); the codes are unpacked on the host
    first, so host memory briefly holds the model's codes.
    """
    from .kernels.select import PATHS

    if compute not in PATHS:
        raise CheckpointError(f"unknown compute path {compute!r}: use {', '.join(PATHS)}")
    if model is None:
        from .zoo.local import build_from_metadata

        model = build_from_metadata(read_metadata(path))[0]
    target = resolve_device(device, CheckpointError, "load with device='cpu'")
    if target.type != "cpu":  # unpack on the host, move, then build the kernels on the device
        from .kernels.select import set_compute

        model = load(path, model, compute="emulated").to(target)
        if compute != "emulated":  # (as on the CPU, ``dtype`` applies to native compute only)
            set_compute(model, compute, release_codes=True, dtype=dtype)
        return model
    meta, tensors = read_checkpoint(path)
    layers = _json(meta, "layers")
    if quant_layers(model):
        raise CheckpointError("load into the float model the checkpoint was made from, not an already quantized one")
    _check_arch(_json(meta, "arch"), model)
    try:
        specs = {n: LayerSpec(**d["spec"]) for n, d in layers.items()}
    except (TypeError, KeyError, LowbitError) as e:
        raise CheckpointError(f"checkpoint layer specs are damaged ({e}); re-save the checkpoint") from None
    apply_specs(model, specs, stored=True)
    # Everything but the packed codes goes in at once; the codes go in one layer at a time below.
    packed = {k[: -len(_PACKED)]: tensors.pop(k) for k in [k for k in tensors if k.endswith(_PACKED)]}
    # safetensors hands out views of its mmap of the file, and the mapping lives while any view
    # does. Scales, biases and norms stay in the model, so without copies they would keep every
    # page of the file resident after loading (SD-like W4A8: 32 MB of RSS beside the kernels).
    # They are under 1 % of the file; the packed views are dropped one layer at a time below.
    tensors = {k: t.clone() for k, t in tensors.items()}
    # no entry: the model had no non-persistent buffers (or lowbit did not store them yet)
    _restore_nonpersistent(model, _json(meta, "nonpersistent") if "nonpersistent" in meta else [], tensors)
    codes_keys = {f"{name}.weight_codes" for name in packed}
    for name in packed:  # symmetric weights: zero-points are not stored (see save)
        scale = tensors.get(f"{name}.weight_quant.scale")
        fmt = parse_optional(specs[name].weight) if name in specs else None
        if f"{name}{_ZERO}" not in tensors and scale is not None and fmt is not None and fmt.symmetric:
            tensors[f"{name}{_ZERO}"] = torch.zeros_like(scale)
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint tensors do not fit the model ({str(e).splitlines()[0][:160]})") from None
    missing = sorted(set(result.missing_keys) - codes_keys)
    if missing or result.unexpected_keys or not codes_keys <= set(result.missing_keys):
        what = (f"{missing[0]!r} is missing" if missing else f"{result.unexpected_keys[0]!r} is unexpected"
                if result.unexpected_keys else "codes arrived for a layer that holds none")
        raise CheckpointError(f"checkpoint tensors do not fit the model ({what}); pass the architecture it was"
                              " quantized from, or re-save the checkpoint")
    del tensors
    modules = dict(model.named_modules())
    streaming = compute != "emulated"
    if streaming:
        from .kernels.select import finish_compute, install_kernel
    # Unpack each layer's codes and (native compute) build its kernel, dropping the codes and the
    # packed bytes before the next layer: peak memory is the kernels plus one layer, never every
    # layer's unpacked codes at once beside the kernels being built.
    for name in list(packed):
        d = layers.get(name, {})
        if d.get("bits") is None:
            raise CheckpointError(f"packed codes for {name!r} have no bit width in the metadata; re-save the checkpoint")
        layer = modules.get(name)
        if not isinstance(layer, QuantWeightLayer):
            raise CheckpointError(f"checkpoint has codes for {name!r}, which is not a quantized layer of this model;"
                                  " pass the architecture it was quantized from")
        shape = d["weight_shape"]
        codes = unpack(packed.pop(name), d["bits"], int(torch.Size(shape).numel())).reshape(shape)
        if list(layer.weight_codes.shape) != list(shape):
            raise CheckpointError(f"checkpoint codes of {name!r} have shape {shape}, the model's layer"
                                  f" {list(layer.weight_codes.shape)}; pass the architecture it was quantized from")
        layer._buffers["weight_codes"] = codes
        if streaming:
            install_kernel(layer, compute, dtype, release_codes=True)
            trim_heap()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"after loading, {left[0]!r} is still on the meta device (the checkpoint does not"
                              " hold it: saved by an older lowbit, or a buffer created after saving); build the"
                              " model on the CPU instead of the meta device, or re-save the checkpoint")
    for n, m in quant_layers(model):
        if isinstance(m, QuantWeightLayer):
            m.weight_sqnr_db = layers.get(n, {}).get("weight_sqnr_db")
    plan = _json(meta, "plan")
    model.lowbit_plan = Plan.from_dict(plan) if plan else None
    if streaming:
        finish_compute(model, dtype, compute)  # the model-wide part: bf16 float tensors if asked
    return model.eval()
