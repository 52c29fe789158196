"""`python -m pretrain --config run.yaml [--override k=v ...] [--resume auto|never|PATH]`: one rank.

User errors and unloadable checkpoints end the rank with one line on stderr and exit status 2."""
import os
import sys

from data_shards.cli_errors import USER_ERRORS, exit_2_on_user_error
from pretrain.checkpoint import CorruptCheckpoint
from pretrain.train import main

if __name__ == "__main__":
    sys.exit(exit_2_on_user_error(f"pretrain rank {os.environ.get('RANK', '0')}", main,
                                  errors=(*USER_ERRORS, CorruptCheckpoint)))
