"""`python -m pretrain --config run.yaml [--override k=v ...] [--resume auto|never|PATH]`: one rank."""
import sys

from pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
