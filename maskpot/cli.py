"""The `maskpot` command. Each package registers its own sub-commands; this module only assembles them.

Sub-command handlers are `func(args) -> int` set with `parser.set_defaults(func=...)`. User errors
(ValueError and its subclasses such as ConfigError and FrameError, missing files) print one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from cluster import cli as cluster_cli
from data_shards import cli as data_cli
from data_shards.cli_errors import USER_ERRORS, user_error
from data_shards.progress import quiet_libraries
from finetune import commands as finetune_commands
from finetune.forcefield import evaluate, md
from maskpot import demo
from maskpot.study import command as study
from pretrain import cli as pretrain_cli
from pretrain import preflight as pretrain_preflight


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskpot",
        description="Masked-atom pretraining of GNN interatomic potentials, then finetuning on "
                    "energies and forces. Units: Å, eV, eV/Å; RMSEs are reported in meV/atom and meV/Å.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Pipeline: generate → shards build → pretrain → finetune (or all of it: maskpot demo).\n"
               "Run `maskpot COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_cli.add_commands(sub)
    pretrain_cli.add_command(sub)
    pretrain_preflight.add_command(sub)  # maskpot preflight: rendezvous + forward/backward on N ranks
    finetune_commands.add_command(sub)
    demo.add_command(sub)
    evaluate.add_command(sub)
    md.add_command(sub)
    study.add_command(sub)
    cluster_cli.add_commands(sub)  # submit / status / cancel: launches stages by module path
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()   # library warnings/INFO lines a user cannot act on (data_shards/progress.py)
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        return user_error(f"maskpot {args.command}", e)
    except KeyboardInterrupt:
        print(f"maskpot {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
