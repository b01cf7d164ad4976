"""The fixed evaluation protocol, as data (documented in docs/evaluation.md).

Every published lowbit number names its protocol. Samples start from seeded noise (the same for
every model), a deterministic sampler turns it into images, and the images are compared in the
feature space of lowbit's own Fashion-MNIST classifier against the 10k test images. Quantized
models are also compared with the FP model's images from the same seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import EvaluationError
from .sampling import SAMPLERS


@dataclass(frozen=True)
class Protocol:
    """Sampler, steps, sample count and seeds of one evaluation."""

    name: str
    sampler: str = "ddim"
    steps: int = 20
    num_samples: int = 2000
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 250
    grid_samples: int = 20

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise EvaluationError(f"unknown sampler {self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        if self.num_samples < 2:
            raise EvaluationError(f"sample count must be at least 2 (FID needs a covariance), got {self.num_samples}")
        if self.steps < 1 or not self.seeds:
            raise EvaluationError("a protocol needs >= 1 sampler step and >= 1 seed")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Protocol":
        """A copy with some fields changed (its name records that it is not a standard protocol)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        if "seeds" in changes:
            changes["seeds"] = tuple(changes["seeds"])
        return replace(self, name=f"{self.name}-custom", **changes)


PROTOCOLS = {
    # quick: what `lowbit demo` runs — 2,000 samples, DDIM 20 steps, one seed
    "quick": Protocol("quick", "ddim", 20, 2000, (0,)),
    # full: the numbers we publish — 10,000 samples (the test-set size), DDIM 50 steps, 3 seeds
    "full": Protocol("full", "ddim", 50, 10000, (0, 1, 2)),
}


def get_protocol(name: "str | Protocol") -> Protocol:
    """A named protocol (``quick`` or ``full``) or the given one."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
