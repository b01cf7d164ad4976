"""Model zoo: the models lowbit ships or builds.

* :mod:`lowbit.zoo.fmnist_unet` — the bundled, trained Fashion-MNIST diffusion UNet (config as
  data, fp16 EMA weights in the package, :func:`load_fmnist_unet`);
* :mod:`lowbit.zoo.toy` — seeded random-initialised networks for quick checks;
* :mod:`lowbit.zoo.local` — diffusion models named on the command line (the bundled one, a local
  diffusers folder) and the architecture a checkpoint records;
* :mod:`lowbit.zoo.ship` — exports a training run into the package.
"""

from lowbit.zoo.fmnist_unet import (
    FMNIST_SCHEDULER_CONFIG,
    FMNIST_UNET_CONFIG,
    build_fmnist_scheduler,
    build_fmnist_unet,
    load_fmnist_unet,
)

__all__ = [
    "FMNIST_SCHEDULER_CONFIG",
    "FMNIST_UNET_CONFIG",
    "build_fmnist_scheduler",
    "build_fmnist_unet",
    "load_fmnist_unet",
]
