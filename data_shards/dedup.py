"""Build-wide duplicate detection: a sample is kept at its first occurrence in plan order, once.

Sample keys hash the stored species, positions (float32) and cell, so the same structure gives the same key
in any input. Chunk tasks run in parallel and only see their own frames: each drops repeats inside its
chunk and returns the key of every valid frame. The driver then walks all chunks in plan order (inputs in
the order given; per input train, val, test blocks; frames in file order) and marks every later occurrence
of a key as a duplicate. A chunk whose dropped positions differ from that decision is rewritten with the
decided drop set. A chunk's bytes depend only on its frames and its drop set, so the result is the same
whatever ran first, and a resumed build decides the same from the keys stored in the sidecars.

Because the first occurrence wins across splits too, a structure never lands in two splits.
"""
from __future__ import annotations

MAX_EXAMPLES = 20


def decide(results: list) -> tuple[dict[int, tuple[int, ...]], dict]:
    """ChunkResults in plan order → ({shard_index: positions to drop}, manifest `duplicates` section)."""
    first: dict[str, str] = {}
    drops: dict[int, tuple[int, ...]] = {}
    count = 0
    examples: list[dict[str, str]] = []
    for r in results:
        dropped = []
        for key, position, where in r.keys:
            if key not in first:
                first[key] = where
                continue
            dropped.append(position)
            count += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append({"key": key, "first": first[key], "again": where})
        drops[r.chunk.shard_index] = tuple(sorted(dropped))
    return drops, {"count": count, "examples": examples}


def needs_rewrite(result, drops: dict[int, tuple[int, ...]]) -> bool:
    return tuple(sorted(result.dropped)) != drops[result.chunk.shard_index]
