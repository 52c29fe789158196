"""The at-convergence read-out's stopping rule: which of its settings, changed, could end a finished read-out
otherwise (`maskpot study --reread-converged` reads only those out again)."""
from __future__ import annotations

# the train keys of the at-convergence read-out's stopping rule (FinetuneJob.converged_config); a key missing
# from an older run's saved config did not exist then, and its feature was off (0)
STOPPING_RULE = ("max_steps", "early_stopping_patience", "early_stopping_min_steps", "early_stopping_anneal_steps")


def changes_readout(key: str, old, now, stopped_early: bool) -> bool:
    """Whether a read-out run with `key` = `old` could end otherwise with `now`. One that ran to its cap without
    the criterion firing ends the same under an annealing tail of any length, or a laxer criterion (more
    patience, a later first step; patience None: never fires)."""
    if old == now:
        return False
    if stopped_early or key == "max_steps":
        return True
    if key == "early_stopping_anneal_steps":
        return False
    infinite = float("inf")
    return (infinite if now is None else now) < (infinite if old is None else old)
