"""The non-finite loss guard of the pretraining and finetuning loops: a batch whose loss is not finite is skipped
(counted, with a warning); `MAX_CONSECUTIVE_NONFINITE` of them in a row end the run with FloatingPointError."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

MAX_CONSECUTIVE_NONFINITE = 50


@dataclass
class NonFiniteGuard:
    skipped: int = 0            # batches skipped so far (the caller checkpoints it)
    run: int = 0                # non-finite losses since the last finite one
    where: str = ""             # said after "non-finite loss" in the warning, e.g. " on some rank"
    advice: str = ""            # said after "training diverged" in the error, e.g. "; lower optim.lr"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("maskpot"))

    def skip(self, step: int) -> int:
        """Count a non-finite loss at `step` (its batch is skipped) and warn; raise after the limit in a row.
        Returns the skipped total."""
        self.skipped, self.run = self.skipped + 1, self.run + 1
        self.log.warning("step %d: non-finite loss%s, batch skipped (%d so far)", step, self.where, self.skipped)
        if self.run >= MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(f"{self.run} consecutive non-finite losses: training diverged{self.advice}")
        return self.skipped

    def check(self, finite: bool, step: int) -> bool:
        """True when the loss at `step` was not finite and its batch is to be skipped (counted as `skip` does);
        a finite loss ends the run."""
        if finite:
            self.run = 0
            return False
        self.skip(step)
        return True
