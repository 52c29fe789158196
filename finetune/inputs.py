"""What a finetuning reads before anything is trained or written: the shard manifest (labelled, non-empty
train and validation splits, labels in eV and eV/Å), the init export's meta and hash, the replay plan."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from data_shards.manifest import QUARANTINE_NAME, file_sha256, load_manifest
from data_shards.units import MAX_FORCE_RMS
from finetune import adapt as A
from finetune import replay as R
from finetune.config import FinetuneConfig
from finetune.init_checkpoint import read_init_meta, weights_file

log = logging.getLogger("finetune")


@dataclass
class Inputs:
    """What `check_inputs` found: the manifest, its hash, the init export's meta (or None)."""
    manifest: dict
    manifest_sha256: str
    init_meta: dict | None
    init_sha256: str | None
    test_split: str          # "" when there is nothing to test on
    new_species: list[int]   # elements of the data the init export has no species for (allowed by config)
    replay: R.ReplayPlan | None = None


def check_inputs(cfg: FinetuneConfig) -> Inputs:
    """Every check that needs the files, before anything is trained or written."""
    d = cfg.data
    manifest = load_manifest(d.manifest_dir)
    where = Path(d.manifest_dir) / "manifest.json"
    samples = {s: manifest["splits"].get(s, {}).get("samples", 0) for s in ("train", "val", "test")}
    if not any(samples.values()):
        raise ValueError(f"{where}: the shards hold no samples" + quarantine_hint(Path(d.manifest_dir), manifest))
    if not manifest.get("labelled"):
        raise ValueError(f"{where}: the shards are not labelled (energies and forces are needed to finetune)")
    if not samples[d.train_split]:
        raise ValueError(f"{where}: training split {d.train_split!r} is empty (splits: {samples})"
                         + quarantine_hint(Path(d.manifest_dir), manifest))
    check_label_units(manifest, where)
    if not samples[d.val_split]:
        raise ValueError(f"{where}: validation split {d.val_split!r} is empty (splits: {samples}); rebuild the "
                         f"shards with a validation fraction or a val=PATH input, or set data.val_split")
    if d.train_frames is not None and d.train_frames > samples[d.train_split]:
        raise ValueError(f"data.train_frames {d.train_frames} exceeds the {samples[d.train_split]} frames of "
                         f"split {d.train_split!r} in {where}")
    test_split = d.test_split
    if test_split and not samples[test_split]:
        log.warning("test split %r of %s is empty: no test evaluation", test_split, where)
        test_split = ""
    init_meta = init_sha = None
    new_species: list[int] = []
    if cfg.init is not None:
        init_meta = read_init_meta(cfg.init)   # missing files, newer format_version: clear errors here
        init_sha = file_sha256(weights_file(cfg.init))
        new_species = A.check_new_species(manifest["elements"], init_meta, cfg.init, cfg.adapt.allow_new_species)
    replay = R.check_replay(cfg, init_meta) if cfg.replay.manifest_dir is not None else None
    return Inputs(manifest, file_sha256(where), init_meta, init_sha, test_split, new_species, replay)


def quarantine_hint(manifest_dir: Path, manifest: dict) -> str:
    """'; N frames were quarantined, e.g. …' when the build set frames aside (wrong units, bad geometry)."""
    count = manifest.get("totals", {}).get("quarantined", 0)
    if not count:
        return ""
    first = ""
    path = manifest_dir / QUARANTINE_NAME
    if path.is_file():
        with path.open() as f:
            rec = json.loads(f.readline() or "{}")
        if rec:
            first = f", e.g. {rec.get('source')} frame {rec.get('frame')} field {rec.get('field')}: {rec.get('reason')}"
    return f"; {count} frame(s) were quarantined when the shards were built ({path}){first}"


def check_label_units(manifest: dict, where: Path) -> None:
    """Refuse labels whose magnitude says they are not in eV and eV/Å (shards built before the per-frame
    units check, or with it bypassed): they would train a model in the wrong units."""
    stats = manifest.get("stats") or {}
    rms = stats.get("force_rms")
    if rms is not None and not rms <= MAX_FORCE_RMS:
        raise ValueError(f"{where}: force RMS of the labelled frames is {rms:.4g} eV/Å, above {MAX_FORCE_RMS:g} "
                         f"eV/Å: the labels are not in eV/Å (kcal/mol/Å are 23× and meV/Å 1000× larger); rebuild "
                         f"the shards with the right `maskpot shards build --units` or convert the files to eV/Å")
