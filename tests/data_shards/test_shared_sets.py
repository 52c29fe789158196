"""`maskpot shards build` on every set of ../shared/data: it builds, verifies and streams each one, and the
counts reconcile (frames read = samples written + quarantined + duplicates)."""
from __future__ import annotations

import json

import pytest

from data_shards.cli import main as cli_main
from data_shards.manifest import SPLITS
from data_shards.stream import ShardStream

SETS = {   # name → inputs relative to ../shared/data (the isolated-atom files are E0 references, --e0s)
    "water_deepmd": ["water_deepmd"],
    "ethanol_rmd17": ["ethanol_rmd17/train.xyz", "test=ethanol_rmd17/test_MD.xyz"],
    "ethanol_rmd17_e0s": ["ethanol_rmd17/train.xyz", "--e0s", "ethanol_rmd17/isolated_atoms.xyz"],
    "3bpa": ["3bpa/train_300K.xyz", "3bpa/train_mixedT.xyz"],
    "3bpa_e0s": ["3bpa/train_300K.xyz", "--e0s", "3bpa/iso_atoms.xyz"],
}


def _prefixed(shared, text: str) -> str:
    if text.startswith("--"):
        return text
    split, sep, rel = text.rpartition("=")
    return f"{split}{sep}{shared / rel}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETS))
def test_every_shared_set_builds_verifies_and_streams(name, shared_data, tmp_path, capsys):
    out = tmp_path / name
    assert cli_main(["shards", "build", *(_prefixed(shared_data, t) for t in SETS[name]), "--out", str(out),
                     "--serial"]) == 0
    assert cli_main(["shards", "verify", str(out)]) == 0
    assert "match the manifest" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["frames_read"] == t["samples_written"] + t["quarantined"] + t["duplicates"]
    assert t["quarantined"] == 0, (out / "quarantine.jsonl").read_text()[:2000]   # real data: nothing bad
    assert manifest["labelled"]
    for split in SPLITS:
        expected = manifest["splits"][split]["samples"]
        stream = ShardStream(out, split, 16, 5.0, verify="fatal")
        graphs = atoms = 0
        for batch in stream:
            graphs += batch.num_graphs
            atoms += batch.num_nodes
        assert graphs == expected
    if name.endswith("_e0s"):   # E0 from the isolated-atom file, not a least-squares fit
        e0 = {int(z): v for z, v in manifest["stats"]["e0"].items()}
        assert e0[8] < -2000.0, e0   # O: ~ -2035.6 eV (ethanol) / -2042 eV (3BPA); a pooled fit gave +62.9
