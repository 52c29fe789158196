"""Batches from DataLoader workers to the training process as numpy buffers, not shared-memory tensors.

torch sends every tensor of a worker's result through its own shared-memory file descriptor (a socket
connect + recvmsg per tensor). A PyG `Batch` of 16 water frames holds ~34 tensors (the data, and the
slice/increment tables), which made receiving a batch cost ~37 ms: more than building it, so 2 workers
streamed slower than none. Pickled as numpy arrays it is one ~1 MB byte copy through the pipe.
"""
from __future__ import annotations

import copyreg
import io
import pickle

import numpy as np
import torch


def _tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def _reduce_tensor(t: torch.Tensor):
    return _tensor_from_numpy, (t.detach().cpu().numpy(),)


class NumpyBatch:
    """Wraps a batch for the trip out of a worker; `.batch` is the batch again on the other side."""

    def __init__(self, batch):
        self.batch = batch

    def __getstate__(self) -> bytes:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
        pickler.dump(self.batch)
        return buffer.getvalue()

    def __setstate__(self, state: bytes) -> None:
        self.batch = pickle.loads(state)  # noqa: S301 - our own worker's bytes over a local pipe, never a file
