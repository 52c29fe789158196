"""`python -m data_shards generate tip3p …` / `python -m data_shards shards build …`."""
import sys

from data_shards.cli import main

sys.exit(main())
