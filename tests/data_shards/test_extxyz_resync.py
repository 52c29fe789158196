"""Issue 12.5: a wrong atom-count line costs exactly its frame. Reading resumes at the next header, every good
frame is kept, and frames read = written + quarantined + duplicates."""
from __future__ import annotations

import json

from tests.helpers.bad_inputs import maskpot, read_samples, water_frames, write_extxyz


def frame_texts(tmp_path, n: int) -> list[list[str]]:
    path = write_extxyz(tmp_path / "good.xyz", water_frames(n, seed=5))
    lines = path.read_text().splitlines(keepends=True)
    per = 12 + 2
    return [lines[i * per:(i + 1) * per] for i in range(n)]


def test_broken_count_lines_cost_exactly_their_frame(tmp_path):
    frames = frame_texts(tmp_path, 9)
    frames[1][0] = "11\n"     # fewer than the 12 atom lines present
    frames[3][0] = "15\n"     # more: would swallow the next frame's header
    frames[5][0] = "-3\n"     # negative
    frames[7][0] = "twelve\n"  # not a number
    frames.append(["12\n", frames[0][1], *frames[0][2:8]])  # truncated last frame
    src = tmp_path / "broken.xyz"
    src.write_text("".join("".join(f) for f in frames))
    from data_shards.readers import count_frames, iter_frames

    assert count_frames(src) == 10
    broken = [i for i, item in enumerate(iter_frames(src)) if isinstance(item, Exception)]
    assert broken == [1, 3, 5, 7, 9]

    done = maskpot("shards", "build", f"train={src}", "--out", str(tmp_path / "shards"), "--serial")
    assert done.returncode == 0, done.stderr[-2000:]
    quarantine = [json.loads(x) for x in (tmp_path / "shards" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["frame"] for q in quarantine) == [1, 3, 5, 7, 9]
    assert all(q["field"] == "natoms" for q in quarantine)
    kept = read_samples(tmp_path / "shards")
    assert sorted(s["frame_index"] for s in kept) == [0, 2, 4, 6, 8]
    assert all(len(s["species"]) == 12 for s in kept)  # no truncated 11-atom sample
    totals = json.loads((tmp_path / "shards" / "manifest.json").read_text())["totals"]
    assert totals["frames_read"] == 10
    assert totals["frames_read"] == totals["samples_written"] + totals["quarantined"] + totals["duplicates"]
