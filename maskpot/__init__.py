"""maskpot: the `maskpot` console script and the applications that drive every stage (demo, study).

Library layers below it, imports one way: data_shards ← pretrain ← finetune ← maskpot; cluster apart.
"""
from data_shards.version import maskpot_version


def version() -> str:
    """The installed maskpot version, or "unknown" when run from a bare source tree (public alias)."""
    return maskpot_version()
