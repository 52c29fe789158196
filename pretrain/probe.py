"""Linear-probe validation for labelled corpora: how much per-atom energy the frozen features carry.

Per frame: x = [mean over atoms of the features entering the energy head, element fractions], y = E / N
(eV/atom). A ridge regression y ≈ x·w + c is fitted on the even-numbered frames of each rank's probe
batches and scored on the odd-numbered ones; the sufficient statistics are all-reduced, so every rank gets
the same answer. Reported in meV/atom next to the baseline that predicts the fitted mean only (the probe
is informative when it beats that). The pretext transforms drop labels, so the probe reads its own,
untransformed stream of the validation split.
"""
from __future__ import annotations

import math

import torch

from data_shards import keys as K
from pretrain import distributed as D
from pretrain.engine import to_model_precision

RIDGE = 1e-6  # relative to the mean feature variance; keeps the solve defined with few frames


def feature_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose first input is the per-atom features: `model.feature_module()` or the energy head."""
    return model.feature_module() if hasattr(model, "feature_module") else model.energy_head


def feature_width(model: torch.nn.Module) -> int:
    return int(getattr(model, "feature_width", 0)) or model.energy_head[0].in_features


def _pooled_features(engine, batch, elements: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F + len(elements)) float64 features and (B,) per-atom energies of one labelled batch."""
    captured = []
    hook = feature_module(engine.module).register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            engine(to_model_precision(batch, engine), compute_forces=False)
    finally:
        hook.remove()
    h = captured[-1].detach().double().cpu()
    graph = batch[K.BATCH].cpu()
    natoms = batch[K.NATOMS].cpu().double()
    pooled = torch.zeros(len(natoms), h.shape[1], dtype=torch.float64).index_add_(0, graph, h)
    species = batch[K.SPECIES].cpu()
    counts = torch.stack([torch.zeros(len(natoms), dtype=torch.float64).index_add_(
        0, graph, (species == z).double()) for z in elements], dim=1)
    x = torch.cat([pooled, counts], dim=1) / natoms[:, None]
    return x, batch[K.ENERGY].cpu().double() / natoms


def ridge_probe(fit_x: torch.Tensor, fit_y: torch.Tensor, eval_x: torch.Tensor,
                eval_y: torch.Tensor) -> dict[str, float]:
    """Fit on (fit_x, fit_y) of all ranks, score on (eval_x, eval_y) of all ranks; RMSE in meV/atom.

    Collective: every rank must call it (with possibly empty tensors of the same width).
    """
    width = fit_x.shape[1]
    n, sum_x, sum_y = D.all_sum(torch.tensor([float(len(fit_y))], dtype=torch.float64), fit_x.sum(0), fit_y.sum())
    nan = {"probe_energy_rmse_mev_per_atom": math.nan, "probe_baseline_rmse_mev_per_atom": math.nan}
    if n.item() < 2:  # n is all-reduced: every rank returns here together
        return {**nan, "probe_frames": int(n.item())}
    mean_x, mean_y = sum_x / n, sum_y / n
    xc, yc = fit_x - mean_x, fit_y - mean_y
    gram, cross = D.all_sum(xc.T @ xc, xc.T @ yc)
    ridge = RIDGE * gram.trace() / width + 1e-12
    w = torch.linalg.solve(gram + ridge * torch.eye(width, dtype=torch.float64), cross)
    residual = (eval_y - mean_y) - (eval_x - mean_x) @ w
    baseline = eval_y - mean_y
    sq, base_sq, count = D.all_sum(residual.pow(2).sum(), baseline.pow(2).sum(),
                                  torch.tensor(float(len(eval_y)), dtype=torch.float64))
    if count.item() < 1:
        return {**nan, "probe_frames": int(n.item())}
    return {"probe_energy_rmse_mev_per_atom": 1000.0 * math.sqrt(sq.item() / count.item()),
            "probe_baseline_rmse_mev_per_atom": 1000.0 * math.sqrt(base_sq.item() / count.item()),
            "probe_frames": int(n.item() + count.item())}


def make_probe(stream, batches: int, elements: list[int]):
    """A callable engine → probe figures over `batches` batches per rank of `stream` (labelled, untransformed)."""

    def probe(engine) -> dict[str, float]:
        stream.set_epoch(0)
        iterator = iter(stream)
        xs, ys = [], []
        for _ in range(batches):
            batch = next(iterator, None)
            if not D.agree(batch is not None):
                break
            x, y = _pooled_features(engine, batch, elements)
            xs.append(x)
            ys.append(y)
        width = feature_width(engine.module) + len(elements)
        x = torch.cat(xs) if xs else torch.zeros(0, width, dtype=torch.float64)
        y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.float64)
        return ridge_probe(x[0::2], y[0::2], x[1::2], y[1::2])

    return probe
