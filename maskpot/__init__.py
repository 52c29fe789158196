"""maskpot: the `maskpot` console script and the applications that drive every stage (demo, study).

Library layers below it, imports one way: data_shards ← pretrain ← finetune ← maskpot; cluster apart.
"""
from importlib import metadata


def version() -> str:
    """The installed maskpot version, or "unknown" when run from a bare source tree."""
    try:
        return metadata.version("maskpot")
    except metadata.PackageNotFoundError:
        return "unknown"
