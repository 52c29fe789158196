"""Resume state of a `ShardStream`: the slot layout an epoch was dealt with, and merging the ranks' states.

A state records, per slot (rank × DataLoader worker), how many samples it handed out in the current epoch;
a `Layout` with a parent describes an epoch resumed on a different world size / worker count, whose slots
deal out the parent layout's unseen remainder (rule in data_shards/stream.py).
"""
from __future__ import annotations

from dataclasses import dataclass

STATE_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """How one epoch's samples were dealt: a world/worker layout, optionally over a parent's remainder."""
    world_size: int
    num_workers: int
    parent: "Layout | None" = None
    parent_consumed: tuple[int, ...] = ()   # samples the parent's slots handed out before the re-deal

    @property
    def n_slots(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def to_json(self, consumed: dict[int, int]) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers,
                "consumed": {str(s): n for s, n in sorted(consumed.items())},
                "parent": None if self.parent is None else
                self.parent.to_json(dict(enumerate(self.parent_consumed)))}

    @staticmethod
    def from_json(d: dict) -> tuple["Layout", dict[int, int]]:
        parent: Layout | None = None
        parent_consumed: tuple[int, ...] = ()
        if d.get("parent") is not None:
            parent, pc = Layout.from_json(d["parent"])
            if sorted(pc) != list(range(parent.n_slots)):
                raise ValueError("stream state: a parent layout must list every slot's consumed count")
            parent_consumed = tuple(pc[s] for s in range(parent.n_slots))
        layout = Layout(int(d["world_size"]), int(d["num_workers"]), parent, parent_consumed)
        return layout, {int(s): int(n) for s, n in d["consumed"].items()}


def merge_stream_states(states: list[dict]) -> dict:
    """One state from every rank's `state_dict()` (e.g. gathered with all_gather_object), needed to
    resume on a different world size or worker count."""
    if not states:
        raise ValueError("merge_stream_states: no states given")
    first = {k: v for k, v in states[0].items() if k != "consumed"}
    consumed = {}
    for s in states:
        if {k: v for k, v in s.items() if k != "consumed"} != first:
            raise ValueError("merge_stream_states: states differ in epoch, seed, split or layout; "
                             "they must come from the ranks of one run at one step")
        consumed.update(s["consumed"])
    return {**first, "consumed": dict(sorted(consumed.items(), key=lambda kv: int(kv[0])))}
