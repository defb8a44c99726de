"""The local NVIDIA GPUs through NVML (nvidia-ml-py): name and total/free memory.

"No NVIDIA GPU" or "no driver" is a value (an empty list and a reason), not a crash. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class LocalGpu:
    """One GPU as NVML sees it now."""

    index: int
    name: str
    total_gib: float
    free_gib: float


def local_gpus() -> tuple[list[LocalGpu], str]:
    """The local GPUs, and when there are none, one line saying why."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"no NVIDIA driver or GPU found ({e})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(LocalGpu(i, name.decode() if isinstance(name, bytes) else name,
                                mem.total / GIB, mem.free / GIB))
        return out, "" if out else "NVML found no GPU"
    except pynvml.NVMLError as e:
        return [], f"NVML could not read the GPUs ({e})"
    finally:
        pynvml.nvmlShutdown()


def used_gib(index: int = 0, uuid: str | None = None) -> float | None:
    """One GPU's used memory as nvidia-smi shows it (CUDA contexts included), or None without a driver. uuid
    (NVML's "GPU-..." id) names the GPU where NVML's index may not be CUDA's (CUDA_VISIBLE_DEVICES, one process
    per GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid is not None
                  else pynvml.nvmlDeviceGetHandleByIndex(index))
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
    except pynvml.NVMLError:
        return None
