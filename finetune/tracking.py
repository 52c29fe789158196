"""MLflow tracking of a finetuning run: the shared Tracker lives in pretrain/tracking.py and its config in
pretrain/tracking_config.py (pretraining is an MLflow run too); this module re-exports them for the finetune
package and adds the lineage to pretraining."""
from __future__ import annotations

from pretrain.registry import CHAMPION_ALIAS, CHAMPION_METRIC, choose_champion, register_version  # noqa: F401
from pretrain.tracking import (  # noqa: F401 - re-exported
    ARTIFACTS_DIR,
    PARENT_TAG,
    PENDING_FILE,
    Journal,
    Tracker,
    replay_pending,
)
from pretrain.tracking_config import TrackingConfig, is_http, server_is_up  # noqa: F401 - re-exported
from pretrain.tracking_links import (  # noqa: F401 - re-exported
    SOURCE_RUN_TAG,
    lineage_description,
    lineage_tags,
    run_url,
    ui_command,
)
