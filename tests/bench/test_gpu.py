"""lowbit.bench.gpu, run on the CPU (the same code path as on a GPU, minus the CUDA memory
counter): the variants are built through save/load onto the device, every row is reported with
its ratio to bf16, and a missing GPU gets a clear error. No timing is asserted."""

import pytest
import torch

from lowbit.bench.gpu import bench_device, markdown_device
from lowbit.errors import EvaluationError


def test_device_benchmark_runs_end_to_end_on_the_cpu():
    (res,) = bench_device(("bundled",), ("w8a8",), "cpu", steps=1, repeats=1, batch=2, compile_=False,
                          log=lambda *_: None)
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", "bf16", "lowbit w8a8"]
    assert rows["bf16"]["vs_bf16"] == 1.0 and rows["fp32"]["sqnr_db"] is None
    assert set(rows["lowbit w8a8"]["paths"]) >= {"native int8 (oneDNN)"}
    assert rows["lowbit w8a8"]["checkpoint_bytes"] < 0.35 * rows["fp32"]["checkpoint_bytes"]
    assert rows["lowbit w8a8"]["sqnr_db"] > 15 and rows["bf16"]["sqnr_db"] > 20  # images, one step
    text = markdown_device([res], "lowbit bench --device cpu")
    assert "| lowbit w8a8 |" in text and "× bf16" in text and "Batch 2," in text
    assert text.startswith("# Device benchmark on the CPU")  # a CPU run is not reported as a GPU one


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_benchmark_without_a_gpu_says_so():
    with pytest.raises(EvaluationError, match="no CUDA GPU.*without --device"):
        bench_device(("bundled",), ("w8a8",), "cuda")


def test_unknown_device_is_refused():
    with pytest.raises(EvaluationError, match="not supported: use .cpu. or .cuda."):
        bench_device(("bundled",), ("w8a8",), "meta")
