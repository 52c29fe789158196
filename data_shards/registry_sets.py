"""Public DFT data sets that `maskpot data fetch NAME` can download, check and shard.

An entry is pinned when it has both a URL and a sha256; fetch refuses a download whose sha256 differs. For an
entry whose sha256 is not pinned yet, fetch downloads, prints the file's sha256 and stops: check the file,
then pass it with `--sha256` (and, once confirmed, pin it here). `member` names the file inside an archive.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_shards.units import UNITS


@dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    url: str | None             # None: no stable public URL recorded; pass --url-override
    sha256: str | None          # of the downloaded file; None: not pinned yet
    format: str                 # a data_shards.readers format name
    units: str                  # data_shards.units name the file is in
    license: str
    citation: str
    member: str | None = None   # path of the data file inside a tar/zip archive

    def __post_init__(self):
        if self.units not in UNITS:
            raise ValueError(f"data set {self.name}: unknown units {self.units!r}; valid units: {sorted(UNITS)}")


_BOTNET = "https://raw.githubusercontent.com/davkovacs/BOTNet-datasets/4a5ea06c3f514f24164428823ba1f5e2d2233b58"
_CHENG = ("https://raw.githubusercontent.com/BingqingCheng/ab-initio-thermodynamics-of-water/"
          "1fbec3baa990f60b5966a9c2a73db1b74dc74794")

REGISTRY: dict[str, DataSet] = {s.name: s for s in (
    DataSet("rmd17_ethanol", "revised MD17 ethanol, 1000 training frames (PBE/def2-SVP), extxyz in eV from the "
            "BOTNet data sets", f"{_BOTNET}/dataset_ethanol/train.xyz",
            # sha256 of the copy in shared/data/ethanol_rmd17/train.xyz, which came from this repository
            "a26a16d8910581fa321fedc3bd3dfe31f2460e8cbfdc7a8f65243f4fd7250dd0",
            "extxyz", "angstrom_ev", "MIT",
            "Christensen & von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018 (2020); "
            "Batatia et al., arXiv:2205.06643 (2022)"),
    DataSet("water_rpbe_morawietz", "liquid water, RPBE-D3, neural network training set", None, None, "n2p2",
            "bohr_hartree", "see the Zenodo record",
            "Morawietz, Singraber, Dellago & Behler, PNAS 113, 8368 (2016)"),
    DataSet("water_revpbe0_cheng", "1593 bulk liquid water configurations, revPBE0-D3, n2p2 input.data",
            f"{_CHENG}/training-set/input.data", None, "n2p2", "bohr_hartree", "see the repository",
            "Cheng, Engel, Behler, Dellago & Ceriotti, PNAS 116, 1110 (2019)"),
)}


def get(name: str, registry: dict[str, DataSet] | None = None) -> DataSet:
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown data set {name!r}; known data sets: {sorted(registry)}")
    return registry[name]
