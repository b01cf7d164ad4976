"""Model zoo: configurations of the models lowbit ships (as data, no weights).

Each module holds a ``diffusers`` config dict plus a builder, so a checkpoint can be rebuilt and
checked against the config it was trained with.
"""

from lowbit.zoo.fmnist_unet import (
    FMNIST_SCHEDULER_CONFIG,
    FMNIST_UNET_CONFIG,
    build_fmnist_scheduler,
    build_fmnist_unet,
)

__all__ = [
    "FMNIST_SCHEDULER_CONFIG",
    "FMNIST_UNET_CONFIG",
    "build_fmnist_scheduler",
    "build_fmnist_unet",
]
