"""`python -m maskpot ...` is the `maskpot` console script."""
import sys

from maskpot.cli import main

if __name__ == "__main__":
    sys.exit(main())
