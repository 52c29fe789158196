"""Progress that suits where the output goes, and library noise filtered to what a user can act on.

`progress(...)` takes tqdm's arguments. On a terminal it is a tqdm bar. When stderr is not a terminal (a
SLURM log, a pipe, CI) a bar would write a carriage-return redraw per update, thousands per run; instead it
prints one plain line every MASKPOT_PROGRESS_EVERY_S seconds (default 30) and one at the end:
`pretrain: 1200/5000 steps (24%), 3.1 steps/s, 6:27 elapsed, loss=0.0123`. TQDM_DISABLE=1 or disable=True
silences both.

`quiet_libraries()` drops warnings a user cannot act on (DeepSpeed's and torch's FutureWarnings about their
own internals, torch.jit deprecations raised inside libraries) and INFO chatter of mlflow/alembic/urllib3;
`warn_once(logger, key, ...)` logs a warning once per process.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from tqdm import tqdm

INTERVAL_ENV = "MASKPOT_PROGRESS_EVERY_S"
DEFAULT_INTERVAL_S = 30.0
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "git", "numexpr", "matplotlib", "filelock")
_warned: set = set()


def _disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """tqdm's update/set_postfix/close interface, writing a plain line at most every `interval_s` seconds."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval_s: float | None = None, file=None, **_ignored):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if self.total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n = self.start_n = initial
        self.interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)) if interval_s is None else interval_s
        self.file = file or sys.stderr
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def _line(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        line = f"{self.desc}: {done} {self.unit}s{pct}, {rate:.3g} {self.unit}s/s, {_clock(elapsed)} elapsed"
        print(line + (f", {self.postfix}" if self.postfix else ""), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.start_n:
                self._line()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal, LineProgress lines otherwise (see the module docstring)."""
    if kwargs.get("disable") or _disabled():
        return tqdm(iterable, **{**kwargs, "disable": True})
    if _is_tty(kwargs.get("file") or sys.stderr):
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def quiet_libraries() -> None:
    """Filter library warnings and INFO lines a user cannot act on (call once at the start of a command)."""
    for module in ("deepspeed", "torch", "torch_geometric", "ray", "mlflow", "webdataset"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|trace).* deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated", category=UserWarning)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def warn_once(logger: logging.Logger, key: str, message: str, *args) -> None:
    """logger.warning(message, *args) the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)
