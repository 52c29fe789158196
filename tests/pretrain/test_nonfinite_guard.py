"""The non-finite loss guard shared by the pretraining and finetuning loops (pretrain.nonfinite)."""
import logging

import pytest

from pretrain.nonfinite import MAX_CONSECUTIVE_NONFINITE, NonFiniteGuard


def test_counts_skips_and_a_finite_loss_ends_the_run(caplog):
    guard = NonFiniteGuard(where=" on some rank", log=logging.getLogger("pretrain"))
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert guard.check(False, 3) and guard.check(False, 3)
        assert not guard.check(True, 3)
    assert (guard.skipped, guard.run) == (2, 0)
    assert "step 3: non-finite loss on some rank, batch skipped (2 so far)" in caplog.text


def test_the_limit_in_a_row_raises_with_the_advice():
    guard = NonFiniteGuard(skipped=7, advice="; lower optim.lr")
    for step in range(MAX_CONSECUTIVE_NONFINITE - 1):
        assert guard.skip(step) == 8 + step
    with pytest.raises(FloatingPointError, match=f"^{MAX_CONSECUTIVE_NONFINITE} consecutive non-finite losses: "
                                                 "training diverged; lower optim.lr$"):
        guard.check(False, 99)
