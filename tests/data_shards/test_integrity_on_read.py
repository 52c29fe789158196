"""Issue 12.2: integrity on read. One changed digit in a sample's energy (the manifest's sha256 updated too)
is caught by the per-sample checksum: evaluate and finetune stop with a one-line error by default (fatal);
with skip the sample is left out and counted; `shards verify` decodes every sample and reports it."""
from __future__ import annotations

import json

import pytest

from tests.helpers.bad_inputs import (
    REPO,
    build_water_shards,
    flip_energy_digit,
    maskpot,
    one_line_error,
    rewrite_member,
)

EXPORT = REPO / "tests" / "assets" / "egnn_tiny_export"
FINETUNE_TINY = REPO / "configs" / "finetune" / "tiny.yaml"


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    shards = build_water_shards(root)
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("train", "test"):
        name = next(s["name"] for s in manifest["shards"] if s["split"] == split)
        rewrite_member(shards / name, flip_energy_digit)
    return shards


def test_evaluate_stops_on_a_changed_digit_by_default(tampered, tmp_path):
    line = one_line_error(maskpot("evaluate", str(EXPORT), str(tampered), "--out", str(tmp_path / "ev")))
    assert "checksum mismatch" in line and ".tar" in line  # old main: exit 0, a wrong RMSE


def test_evaluate_skip_leaves_the_sample_out_and_counts_it(tampered, tmp_path):
    done = maskpot("evaluate", str(EXPORT), str(tampered), "--out", str(tmp_path / "ev"), "--integrity", "skip")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["integrity"] == {"policy": "skip", "skipped": 1}
    assert metrics["structures"] == 3
    assert "1 sample(s) failed their checksum" in done.stdout


def test_finetune_stops_on_a_changed_digit(tampered, tmp_path):
    line = one_line_error(maskpot("finetune", "--config", str(FINETUNE_TINY), "--override",
                                  f"data.manifest_dir={tampered}", f"train.out_dir={tmp_path / 'ft'}",
                                  "train.max_steps=2", "tracking.enabled=false"))
    assert "checksum mismatch" in line


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_skip_counts_across_workers_and_fatal_names_the_sample(tampered, workers):
    from data_shards.integrity import SampleIntegrityError
    from data_shards.stream import ShardStream

    stream = ShardStream(tampered, "train", 2, 3.5, num_workers=workers, integrity_policy="skip")
    assert sum(b.num_graphs for b in stream) == 5 and stream.integrity_skipped == 1
    with pytest.raises(SampleIntegrityError, match="checksum mismatch"):
        list(ShardStream(tampered, "train", 2, 3.5))


def test_shards_verify_decodes_every_sample(tampered):
    done = maskpot("shards", "verify", str(tampered))
    assert done.returncode == 1
    bad = [x for x in done.stdout.splitlines() if "checksum mismatch" in x]
    assert len(bad) == 2, done.stdout  # old main: "all shards match" (the manifest sha256 was updated)
