"""`python -m pretrain --config run.yaml [--override k=v ...] [--resume auto|never|PATH]`: one rank.

User errors and unloadable checkpoints end the rank with one line on stderr and exit status 2."""
import os
import sys

from pretrain.checkpoint import CorruptCheckpoint
from pretrain.train import main

EXIT_USER_ERROR = 2

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, NotADirectoryError, CorruptCheckpoint) as e:
        print(f"pretrain rank {os.environ.get('RANK', '0')}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
