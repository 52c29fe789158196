"""Activation recomputation that survives double backward (forces by autograd, then a force loss).

`torch.utils.checkpoint` does not lower the peak here: with create_graph the recomputed activations become
part of the force graph and stay alive until the loss backward, as if nothing had been checkpointed. Instead:

    y = recompute_twice(fn, x1, x2, *constants)      fn(x1, x2, *constants) -> (y1, y2), any shapes,
                                                     using the parameters of the module fn is bound to

keeps only (x1, x2) per call. Its backward is itself a Function that keeps only (x1, x2, ∂L/∂y); the second
backward recomputes fn and its first backward under autograd and differentiates them. Peak memory is one
call's edge activations instead of all layers'; the cost is recomputing the forward (twice) and the first
backward (once).

Inside `forces_only()` (the model's autograd.grad(E, positions) call) the first backward skips the
parameter gradients, which that call discards anyway.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_FORCES_ONLY = contextvars.ContextVar("maskpot_recompute_forces_only", default=False)


@contextlib.contextmanager
def forces_only():
    token = _FORCES_ONLY.set(True)
    try:
        yield
    finally:
        _FORCES_ONLY.reset(token)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def _owner_parameters(fn) -> tuple[torch.Tensor, ...]:
    owner = getattr(fn, "__self__", None)
    if owner is None:
        raise TypeError("recompute_twice needs a bound method of an nn.Module (its parameters are differentiated)")
    return tuple(p for p in owner.parameters() if p.requires_grad)


def _differentiable(outputs, grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (output, incoming gradient) pairs through which anything flows (an output may be a constant)."""
    kept = [(y, g) for y, g in zip(outputs, grads) if y.requires_grad]
    return [y for y, _ in kept], [g for _, g in kept]


def recompute_twice(fn, x1: torch.Tensor, x2: torch.Tensor, *constants):
    params = _owner_parameters(fn)
    return _Recompute.apply(fn, constants, len(params), x1, x2, *params)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, constants, n_params, x1, x2, *params):
        ctx.fn, ctx.constants, ctx.n_params = fn, constants, n_params
        ctx.save_for_backward(x1, x2)
        with torch.no_grad():
            y1, y2 = fn(x1, x2, *constants)
        ctx.zeros = (y1.new_zeros(()).expand(y1.shape), y2.new_zeros(()).expand(y2.shape))   # for unused outputs
        return y1, y2

    @staticmethod
    def backward(ctx, g1, g2):
        x1, x2 = ctx.saved_tensors
        g1 = ctx.zeros[0].contiguous() if g1 is None else g1
        g2 = ctx.zeros[1].contiguous() if g2 is None else g2
        params = _owner_parameters(ctx.fn)
        grads = _RecomputeGrad.apply(ctx.fn, ctx.constants, _FORCES_ONLY.get(), g1, g2, x1, x2, *params)
        return (None, None, None) + tuple(grads)


class _RecomputeGrad(torch.autograd.Function):
    """(g1, g2, x1, x2, params) -> (∂L/∂x1, ∂L/∂x2, ∂L/∂params) of fn by recomputation; twice differentiable."""

    @staticmethod
    def forward(ctx, fn, constants, skip_params, g1, g2, x1, x2, *params):
        ctx.fn, ctx.constants = fn, constants
        ctx.save_for_backward(g1, g2, x1, x2)
        inputs = (_leaf(x1), _leaf(x2))
        wrt = inputs if skip_params else inputs + params
        with torch.enable_grad():
            outputs, incoming = _differentiable(fn(*inputs, *constants), (g1, g2))
            grads = torch.autograd.grad(outputs, wrt, incoming, allow_unused=True) if outputs else (None,) * len(wrt)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
        if skip_params:  # discarded by the caller: zeros, not computed
            grads += [torch.zeros_like(p) for p in params]
        return tuple(grads)

    @staticmethod
    def backward(ctx, gg1, gg2, *gg_params):
        g1, g2, x1, x2 = ctx.saved_tensors
        params = _owner_parameters(ctx.fn)
        g_leaves, x_leaves = (_leaf(g1), _leaf(g2)), (_leaf(x1), _leaf(x2))
        pairs = [(leaf, gg) for leaf, gg in zip(x_leaves + params, (gg1, gg2) + gg_params) if gg is not None]
        wrt = g_leaves + x_leaves + params
        second = (None,) * len(wrt)
        with torch.enable_grad():
            outputs, incoming = _differentiable(ctx.fn(*x_leaves, *ctx.constants), g_leaves)
            first = torch.autograd.grad(outputs, [leaf for leaf, _ in pairs], incoming, create_graph=True,
                                        allow_unused=True) if pairs and outputs else ()
            used = [(f, gg) for f, (_, gg) in zip(first, pairs) if f is not None and f.requires_grad]
            if used:
                second = torch.autograd.grad([f for f, _ in used], wrt, [gg for _, gg in used], allow_unused=True)
        return (None, None, None) + tuple(second)
