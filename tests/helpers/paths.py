"""Where things are: the repository, the example configs the tests start from, the committed assets."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
TINY_EXPORT = ASSETS / "egnn_tiny_export"
PRETRAIN_TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
FINETUNE_TINY = REPO / "configs" / "finetune" / "tiny.yaml"
SHARED_DATA = Path(os.environ.get("MASKPOT_SHARED_DATA", REPO.parent / "shared" / "data"))
