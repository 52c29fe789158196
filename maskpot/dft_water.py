"""The DFT water set in DeePMD layout, as the demo (`--dft-water`) and the study (`dft_water.path`) read it.

Four DeePMD systems `data_0` … `data_3`, directly in the folder or under `data/` (the layout of deepmd-kit's
water example, e.g. ../shared/data/water_deepmd); maskpot's split: train data_0 + data_1, val data_2,
test data_3.
"""
from __future__ import annotations

from pathlib import Path

SYSTEM_SPLITS = ("train", "train", "val", "test")   # of data_0, data_1, data_2, data_3


def dft_water_inputs(path: str | Path, setting: str, hint: str = "") -> list[str]:
    """`split=system` inputs for `build_shards`; a FileNotFoundError naming `setting` and what is missing."""
    root = Path(path)
    if not (root / "data_0").is_dir() and (root / "data" / "data_0").is_dir():
        root = root / "data"   # the deepmd-kit example layout: water/data/data_N
    systems = [root / f"data_{i}" for i in range(len(SYSTEM_SPLITS))]
    missing = [str(s) for s in systems if not (s / "type.raw").is_file()]
    if missing:
        raise FileNotFoundError(f"{setting} {path}: expected DeePMD systems data_0..data_3, missing {missing}"
                                + (f" ({hint})" if hint else ""))
    return [f"{split}={system}" for split, system in zip(SYSTEM_SPLITS, systems)]
