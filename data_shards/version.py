"""The installed maskpot version, read once here for every layer (manifests, exports, tracking tags)."""
from __future__ import annotations

from importlib import metadata


def maskpot_version() -> str:
    """The installed maskpot version, or "unknown" when run from a bare source tree."""
    try:
        return metadata.version("maskpot")
    except metadata.PackageNotFoundError:
        return "unknown"
