"""Why torch cannot use a GPU here, in one line; and, run as a script, the device check of ``make gpu-check``.

A leaf: it imports torch and the standard library only, so ``python evaclip/cuda_env.py`` runs on a fresh node before
anything of evaclip's dependencies is installed (``make gpu-check`` uses it to pick the Python whose torch sees the
GPU). The usual causes, each named: a CPU-only torch build, no NVIDIA driver, a driver older than the CUDA that torch
was built for (torch 2.11 cu130 needs the CUDA 13 driver, 580 or newer), no visible device.

    python evaclip/cuda_env.py    # prints the compute capability as NN (90 for Hopper) and exits 0, or the reason, 1
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a script: evaclip/ must not shadow the standard library (evaclip/logging.py) for torch

import torch  # noqa: E402

# The first driver branch of each CUDA major version (NVIDIA's CUDA toolkit / driver compatibility table).
_MIN_DRIVER = {11: "450", 12: "525", 13: "580"}


def driver_cuda_version() -> Optional[tuple[int, int]]:
    """The newest CUDA version the installed NVIDIA driver supports, as (major, minor), or None without a driver
    (``cuDriverGetVersion`` of libcuda; it needs no GPU context, so it also answers when CUDA cannot initialise)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def _torch_cuda_version() -> Optional[tuple[int, int]]:
    if not torch.version.cuda:
        return None
    major, minor = (torch.version.cuda.split(".") + ["0"])[:2]
    return int(major), int(minor)


def cuda_unavailable_reason() -> Optional[str]:
    """None when torch can use a CUDA device; otherwise why not, in one line that says what to do."""
    if torch.cuda.is_available():
        return None
    built = _torch_cuda_version()
    if built is None:
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): use a Python whose torch "
                "is a CUDA build")
    driver = driver_cuda_version()
    if driver is None:
        return (f"torch {torch.__version__} is built for CUDA {built[0]}.{built[1]} but no NVIDIA driver was found "
                "(libcuda.so.1 does not load): install the driver, or run on the GPU node")
    if driver[0] < built[0]:  # a newer minor version of the same major still runs (minor version compatibility)
        need = _MIN_DRIVER.get(built[0])
        return (f"the NVIDIA driver is too old for this torch: it supports CUDA up to {driver[0]}.{driver[1]}, torch "
                f"{torch.__version__} is built for CUDA {built[0]}.{built[1]}; update the driver"
                + (f" (CUDA {built[0]} needs >= {need})" if need else "")
                + f" or install a torch built for CUDA {driver[0]}.x")
    try:
        count = torch.cuda.device_count()
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return f"CUDA does not initialise ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
    if count == 0:
        return (f"torch sees no CUDA device (driver CUDA {driver[0]}.{driver[1]}, torch built for CUDA {built[0]}."
                f"{built[1]}): check CUDA_VISIBLE_DEVICES and nvidia-smi")
    return "torch sees no CUDA device"


def main() -> int:
    """Print the current device's compute capability as NN and return 0, or print the reason on stderr and return 1."""
    why = cuda_unavailable_reason()
    if why is not None:
        print(f"gpu-check: {sys.executable}: {why}", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability()
    print(10 * major + minor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
