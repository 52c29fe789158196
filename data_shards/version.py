"""The installed maskpot version and the platform a run ran on, read here for every layer (manifests,
exports, tracking tags, results)."""
from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path


def maskpot_version() -> str:
    """The installed maskpot version, or "unknown" when run from a bare source tree."""
    try:
        return metadata.version("maskpot")
    except metadata.PackageNotFoundError:
        return "unknown"


def platform_info() -> dict[str, str]:
    """What a run's floating-point results depend on besides code, config and data: the CPU model (kernels
    take other paths on other instruction sets — the same study finetune gave a test force RMSE of 86.64 meV/Å
    on an AMD EPYC, the same digits in two sessions, and 86.18 on an Intel Xeon), the GPU when one is
    in use, and the versions of Python, torch and numpy (those already imported: this never imports them)."""
    info = {"cpu": _cpu_model(), "python": platform.python_version()}
    for name in ("torch", "numpy"):
        if (module := sys.modules.get(name)) is not None:
            info[name] = str(getattr(module, "__version__", "unknown"))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
