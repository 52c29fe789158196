"""Reader registry: format detection, cheap frame counts, streaming and validated reads.

Every reader module exposes `detect(path) -> bool`, `count_frames(path) -> int` and
`iter_frames(path, start, stop, **options) -> Iterator[Frame | FrameError]`. Frames are yielded
unvalidated; a frame that cannot be parsed at all is yielded as a FrameError so a builder can
quarantine it and continue. Each reader yields exactly one item per counted frame in [start, stop).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data_shards.frame import Frame, FrameError
from data_shards.readers import asedb, deepmd, extxyz, n2p2, npz


@dataclass(frozen=True)
class Reader:
    name: str
    description: str
    detect: Callable[[Path], bool]
    count_frames: Callable[[Path], int]
    iter_frames: Callable[..., Iterator[Frame | FrameError]]


READERS: dict[str, Reader] = {  # detection tries them in this order
    "extxyz": Reader("extxyz", "extended XYZ file (*.extxyz, *.xyz)",
                     extxyz.detect, extxyz.count_frames, extxyz.iter_frames),
    "deepmd": Reader("deepmd", "DeePMD npy system folder (type.raw, set.*/) or a root holding many",
                     deepmd.detect, deepmd.count_frames, deepmd.iter_frames),
    "asedb": Reader("asedb", "ASE SQLite database (*.db), one frame per row in id order",
                    asedb.detect, asedb.count_frames, asedb.iter_frames),
    "npz": Reader("npz", "NumPy archive (*.npz) with a key map and units (layouts: default, gamd)",
                  npz.detect, npz.count_frames, npz.iter_frames),
    "n2p2": Reader("n2p2", "RuNNer/n2p2 input.data (begin/lattice/atom/energy/end blocks; Bohr, Hartree)",
                   n2p2.detect, n2p2.count_frames, n2p2.iter_frames),
}


def _formats_help() -> str:
    return "; ".join(f"{name}: {r.description}" for name, r in READERS.items())


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def get_reader(fmt: str) -> Reader:
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {_formats_help()}")
    return READERS[fmt]


def detect_format(path) -> str:
    """The registry name of the reader that recognises `path` (by suffix or folder layout)."""
    path = _existing(path)
    for name, reader in READERS.items():
        if reader.detect(path):
            return name
    problem = deepmd.missing_type_raw(path)
    if problem:
        raise ValueError(problem)
    raise ValueError(f"{path}: cannot tell its format; valid formats: {_formats_help()}")


def _resolve(path, fmt: str | None) -> tuple[Path, Reader]:
    path = _existing(path)
    return path, get_reader(fmt if fmt is not None else detect_format(path))


def count_frames(path, fmt: str | None = None) -> int:
    """Number of frames (cheap: headers and array shapes only, no full parse)."""
    path, reader = _resolve(path, fmt)
    return reader.count_frames(path)


def iter_frames(path, fmt: str | None = None, start: int = 0, stop: int | None = None,
                **options) -> Iterator[Frame | FrameError]:
    """Stream frames [start, stop) unvalidated; unparseable frames come as FrameError items.

    `options` go to the reader (extxyz, asedb: energy_key, forces_key; npz: layout, keys, units, type_map;
    n2p2: units).
    """
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    path, reader = _resolve(path, fmt)
    return reader.iter_frames(path, start=start, stop=stop, **options)


def read_frames(path, fmt: str | None = None, require_labels: bool = True, **options) -> list[Frame]:
    """All frames, validated; raises the first FrameError (file, frame, field) found."""
    frames = []
    for item in iter_frames(path, fmt, **options):
        if isinstance(item, FrameError):
            raise item
        frames.append(item.validate(require_labels))
    return frames


__all__ = ["READERS", "Reader", "Frame", "FrameError", "get_reader", "detect_format", "count_frames",
           "iter_frames", "read_frames"]
