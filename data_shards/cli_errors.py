"""User errors at the command line: one line `PROG: error: MESSAGE` on stderr and exit status 2.

Every layer's entry point uses these (data_shards.cli, pretrain.train and `python -m pretrain`, finetune.commands,
maskpot.cli). cluster.cli stands apart from the layers and keeps its own copy (same format and status).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)
EXIT_USER_ERROR = 2

T = TypeVar("T")


def user_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: err` on stderr (flushed); returns EXIT_USER_ERROR for the caller to return."""
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def exit_2_on_user_error(prog: str, fn: Callable[[], T],
                         errors: tuple[type[BaseException], ...] = USER_ERRORS) -> T | int:
    """`fn()`, or EXIT_USER_ERROR after `user_error` when it raises one of `errors`."""
    try:
        return fn()
    except errors as err:
        return user_error(prog, err)
