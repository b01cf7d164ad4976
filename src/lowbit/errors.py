"""Exception classes for lowbit.

Every error a user can cause (a bad format string, bad calibration data, a damaged checkpoint,
a checkpoint for another model) is raised as a subclass of :class:`LowbitError` whose message is
one line naming the problem and the fix. The CLI prints that line and exits with status 2 instead
of showing a traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class FormatError(LowbitError, ValueError):
    """An unknown or impossible number format, granularity or bit width."""


class PlanError(LowbitError, ValueError):
    """A plan, layer spec or recipe that cannot be applied to the model."""


class CalibrationError(LowbitError, ValueError):
    """Calibration data that is empty, non-finite, or never reached a quantizer."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint that is missing, truncated, tampered with, or made for another model."""


class EvaluationError(LowbitError, ValueError):
    """A bad sample count, sampler, image batch, or missing/corrupted metric reference."""


class DataError(LowbitError, ValueError):
    """A dataset file that is missing, truncated, or not in the expected format."""
