"""`python -m cluster.launch [--] CMD ...`: export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from SLURM_*, exec CMD.

Used as `srun python -m cluster.launch python -m pretrain --config run.yaml` so that each SLURM task
becomes one torch.distributed rank without torchrun.
"""
from __future__ import annotations

import os
import sys

from cluster.ranks import resolve


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        sys.exit("usage: python -m cluster.launch [--] COMMAND [ARGS...]")
    dist = resolve()
    os.environ.update(dist.as_environ())
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
