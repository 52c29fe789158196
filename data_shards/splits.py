"""How inputs without a split= prefix are divided between train, val and test (`data_shards.build`).

`split_ranges`: contiguous blocks in frame order; `shuffled_positions`: a seeded permutation cut by the
fractions; `assign_groups`: whole inputs (files, DeePMD systems) per split.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from data_shards.manifest import SPLITS

log = logging.getLogger("data_shards.build")


def split_ranges(frames: int, fractions: tuple[float, ...]) -> dict[str, tuple[int, int]]:
    """Contiguous blocks [start, stop) per split, in frame order (neighbouring MD frames stay together)."""
    bounds, acc = [0], 0.0
    for f in fractions:
        acc += f
        bounds.append(min(frames, round(frames * acc)))
    bounds[-1] = frames
    return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}


def shuffled_positions(path: str, frames: int, fractions: tuple[float, ...], seed: int) -> dict[str, list[int]]:
    """Sorted frame positions per split: a permutation seeded by (seed, path as given) cut by `fractions`
    (so high-force or rare frames of a small file are spread over the splits, unlike contiguous blocks)."""
    stream = int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little")
    order = np.random.default_rng(stream).permutation(frames)
    return {s: sorted(order[a:b].tolist()) for s, (a, b) in split_ranges(frames, fractions).items()}


def assign_groups(specs: list, fractions: tuple[float, ...], seed: int) -> dict[str, str]:
    """{input path: split} for whole inputs: largest first, equal sizes in the order of sha256(seed, path as
    given), each goes to the split furthest below its target share of the frames (relative to the target),
    so that sizes, not counts, fill the fractions and a few groups still reach every split with a non-zero
    fraction. A pure function of paths, sizes and seed."""
    total = sum(s.frames for s in specs)
    targets = {name: f * total for name, f in zip(SPLITS, fractions)}
    filled = dict.fromkeys(SPLITS, 0)
    order = sorted(specs, key=lambda s: (-s.frames, hashlib.sha256(f"{seed}:{s.path}".encode()).hexdigest(),
                                         s.path))
    assigned = {}
    for spec in order:
        open_splits = [name for name in SPLITS if targets[name] > 0]
        split = max(open_splits, key=lambda n: ((targets[n] - filled[n]) / targets[n], -SPLITS.index(n)))
        assigned[spec.path] = split
        filled[split] += spec.frames
    empty = [n for n in SPLITS if targets[n] > 0 and not filled[n]]
    if empty:
        log.warning("split_by input: %d group(s) cannot fill every split; %s got none (fractions %s)",
                    len(specs), empty, list(fractions))
    return assigned
