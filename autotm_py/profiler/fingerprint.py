"""Device fingerprints: which machine a cached timing belongs to.

CPU: the CPU model, the intra-op thread count and the torch version. CUDA: the GPU name, the
driver and CUDA versions, cuDNN, the torch version, and how short kernels were timed
(`timing=graphs`: from CUDA graph replays; rows timed otherwise are not mixed in). Readable on purpose: `autotm cache info`
shows them.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _driver_version() -> str:
    try:
        v = int(torch._C._cuda_getDriverVersion())  # e.g. 12040 -> "12.4"
        return f"{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - private API; the fingerprint stays usable without it
        return "unknown"


def device_fingerprint(device: str = "cpu") -> str:
    """One line naming the device, e.g. 'cpu|AMD EPYC|threads=2|torch=2.13.0+cpu'."""
    if device == "cuda":
        idx = torch.cuda.current_device()
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return (f"cuda|{torch.cuda.get_device_name(idx)}|driver={_driver_version()}"
                f"|cuda={torch.version.cuda}|cudnn={cudnn}|torch={torch.__version__}|timing=graphs")
    return f"cpu|{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
