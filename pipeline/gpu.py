"""Whether this host can run CUDA work, and if not, why, in words a user can act on.

The usual cause on a cluster: pip resolved a torch built for a newer CUDA than the nodes' driver offers, so
`torch.cuda.is_available()` is False and, unless a run stops, it trains on the CPU for days.
"""

from __future__ import annotations

import ctypes

import torch

FIX = (
    "install the torch and DALI builds for this driver (README: 'CUDA 12 clusters'), or pass --allow-cpu to run "
    "it on the CPU anyway"
)


def driver_cuda_version() -> str | None:
    """The CUDA version the NVIDIA driver supports ("12.4"), or None when no driver library loads."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def diagnosis() -> str:
    """Why CUDA is not usable here: torch's CUDA build against what the driver offers."""
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build"
    driver = driver_cuda_version()
    if driver is None:
        return f"{build} is built for CUDA {torch.version.cuda}, and no NVIDIA driver was found (libcuda.so.1)"
    if _numbers(driver) < _numbers(torch.version.cuda):
        return f"{build} is built for CUDA {torch.version.cuda}, newer than the CUDA {driver} this driver offers"
    return (
        f"{build} is built for CUDA {torch.version.cuda} and the driver offers CUDA {driver}, but torch sees "
        "no GPU (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
    )


def _numbers(version: str) -> tuple[int, ...]:
    """'12.4' as (12, 4), for comparing versions."""
    return tuple(int(part) for part in version.split(".")[:2])


def refusal(what: str) -> str:
    """The one-line error for a GPU setting on a host where CUDA is not usable."""
    return f"{what}, but CUDA is not usable on this host: {diagnosis()}; {FIX}"
