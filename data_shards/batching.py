"""Groups of graphs for one batch: closed by a graph count and, optionally, by an atom budget."""
from __future__ import annotations

import warnings
from typing import Iterator


def batch_by_budget(datas: Iterator, batch_size: int, max_atoms: int | None, drop_last: bool) -> Iterator[list]:
    """Groups of graphs closed at `batch_size` graphs or before the atom total would exceed `max_atoms`
    (a graph larger than the budget alone is a batch). drop_last drops a short final group."""
    group: list = []
    atoms, warned = 0, False
    for data in datas:
        n = int(data.num_nodes)
        if group and max_atoms is not None and atoms + n > max_atoms:
            yield group
            group, atoms = [], 0
        if max_atoms is not None and n > max_atoms and not warned:
            warnings.warn(f"a structure of {n} atoms exceeds max_atoms={max_atoms}; it forms a batch of its own",
                          RuntimeWarning, stacklevel=2)
            warned = True
        group.append(data)
        atoms += n
        if len(group) == batch_size:
            yield group
            group, atoms = [], 0
    if group and not drop_last:
        yield group
