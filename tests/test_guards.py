"""lowbit._guards: skipping dynamo's guards only on calls already made with them."""

import pytest
import torch
from torch import nn

from lowbit._guards import GuardSkipping, call_key, skipping_available

pytestmark = pytest.mark.skipif(not skipping_available(), reason="this PyTorch has no skip_guard_eval_unsafe")


class _Flatten(nn.Module):
    """Shape-specialised under dynamic=False: the traced view bakes the batch size in, so a graph
    run on another batch size gives a wrong result or an error, never the right one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, x, scale: float = 1.0):
        y = self.lin(x.reshape(x.shape[0] * 2, 12)) * scale
        return y if not self.training else y + 1


def _model():
    torch.manual_seed(0)
    return _Flatten().eval()


def _setup():
    """The model, its guard-skipping compiled form (eager backend: no C++ compiler needed) and an input."""
    m = _model()
    return m, GuardSkipping(m, backend="eager", dynamic=False), torch.randn(4, 24)


@torch.no_grad()
def test_alternating_shapes_match_eager_and_skip_after_the_first_call():
    m = _model()
    fast = GuardSkipping(m, backend="eager", dynamic=False)
    g = torch.Generator().manual_seed(1)
    for b in (4, 2, 4, 2, 3, 4, 3):
        x = torch.randn(b, 24, generator=g)
        assert torch.equal(fast(x), m(x)), b
    assert fast.skipped == 4  # 4, 2 and 3 each ran once with the full guards


def test_grad_mode_dtype_offset_and_train_flag_are_part_of_the_key():
    m = _model()
    x = torch.randn(4, 24)
    base = call_key((x,), {}, m)
    with torch.no_grad():
        assert call_key((x,), {}, m) != base
    assert call_key((x.double(),), {}, m) != base
    assert call_key((torch.randn(5, 24)[1:],), {}, m) != base  # same shape, storage offset 24
    assert call_key((x,), {"scale": 2.0}, m) != call_key((x,), {"scale": 1.0}, m)
    m.train()
    assert call_key((x,), {}, m) != base


def test_train_eval_switch_reruns_the_guards():
    m, fast, x = _setup()
    with torch.no_grad():
        fast(x)
        m.train()
        assert torch.equal(fast(x), m(x))  # the +1 branch: the eval graph would be wrong
        assert fast.skipped == 0


def test_unknown_argument_kinds_never_skip():
    assert call_key((object(),), {}) is None
    assert call_key((None, [1, 2.0], {"a": torch.zeros(1)}), {}) is not None  # these it describes
    m = _model()
    fast = GuardSkipping(lambda x, o: m(x), backend="eager", dynamic=False)
    x = torch.randn(4, 24)
    with torch.no_grad():
        for _ in range(3):
            fast(x, object())
    assert fast.skipped == 0


def test_environment_switch_turns_skipping_off(monkeypatch):
    monkeypatch.setenv("LOWBIT_SKIP_GUARDS", "0")
    assert not skipping_available()
    m, fast, x = _setup()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(fast(x), m(x))
    assert fast.skipped == 0


def test_a_call_dynamo_cannot_serve_without_compiling_is_retried_with_the_guards():
    m, fast, x = _setup()
    with torch.no_grad():
        fast(x)
        torch._dynamo.reset()  # drops the cached graph: under the skipping stance dynamo refuses
        assert torch.equal(fast(x), m(x))
        assert fast.skipped == 0 and fast(x) is not None and fast.skipped == 1
