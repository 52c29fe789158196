"""`python -m finetune --config FILE [--init EXPORT] [--override k=v ...]`."""
import sys

from finetune.commands import main

if __name__ == "__main__":
    sys.exit(main())
