"""EpochBatches: epochs in order, the position a resume seeks to, lockstep epoch ends, an empty stream."""
import pytest

from data_shards.epochs import EpochBatches


class ListStream:
    """A stream whose epoch e deals [(e, 0), (e, 1), …] (`sizes[e]` batches; the last size repeats)."""

    def __init__(self, sizes):
        self.sizes, self.epoch, self.epochs = sizes, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs.append(epoch)

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.sizes[min(self.epoch, len(self.sizes) - 1)])])


def test_epochs_follow_each_other_and_a_seek_resumes_the_same_batches():
    batches = EpochBatches(ListStream([3]))
    drawn = [batches.next() for _ in range(5)]
    assert drawn == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and batches.position() == (1, 2)
    resumed = EpochBatches(ListStream([3]), *batches.position())
    assert [next(resumed) for _ in range(2)] == [(1, 2), (2, 0)]


def test_agree_ends_the_epoch_when_any_rank_runs_dry():
    """The other rank has 2 batches per epoch: this one (3 per epoch) stops its epochs after 2 as well."""
    seen = []

    def other_rank_has_two(has_batch):
        seen.append(has_batch)
        return has_batch and batches.consumed < 2

    batches = EpochBatches(ListStream([3]), agree=other_rank_has_two)
    assert [batches.next() for _ in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert seen[2] is True   # this rank still had a batch when the epoch ended


def test_a_stream_with_no_batch_fails_with_the_given_message():
    with pytest.raises(RuntimeError, match="the replay split 'train' yielded no batch"):
        EpochBatches(ListStream([0]), empty="the replay split 'train' yielded no batch").next()
