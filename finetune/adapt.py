"""Adapting a pretrained model to the finetune data (the `adapt:` section and early stopping).

The *head* is the energy/force output MLPs a model names in `head_parameter_prefixes`; everything else
(species embedding, message passing) is the *backbone*. Options:
  - freeze the backbone for the first K optimizer steps (or throughout): its parameters get no gradient,
    so AdamW (which skips parameters without one) leaves them bit-identical, weight decay included;
  - a learning-rate multiplier per part: each part has its own AdamW groups whose lr the schedule scales
    by the same factor, so the ratio holds throughout;
  - re-initialise the heads after loading the export (the modules' own `reset_parameters`);
  - elements absent from the export's species: refused, or with `allow_new_species` their rows of the
    species embedding (indexed by atomic number Z, 0..MAX_Z) are redrawn from N(0, 1), nn.Embedding's
    own initialisation. The export's rows for elements it never saw were never trained (no gradient ever
    reaches an unused row) and are replaced so that the model does not depend on them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from data_shards.keys import CHEMICAL_SYMBOLS
from finetune.config import AdaptConfig, OptimConfig
from pretrain.schedule import lr_factor

log = logging.getLogger("finetune")

BACKBONE, HEAD = "backbone", "head"


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"backbone": [(name, p), ...], "head": [...]} by the model's `head_parameter_prefixes`."""
    prefixes = tuple(getattr(model, "head_parameter_prefixes", ()))
    if not prefixes:
        raise ValueError(f"{type(model).__name__} declares no head_parameter_prefixes: cannot tell its output "
                         f"heads from its backbone")
    parts: dict[str, list] = {BACKBONE: [], HEAD: []}
    for name, param in model.named_parameters():
        parts[HEAD if name.startswith(prefixes) else BACKBONE].append((name, param))
    if not parts[HEAD]:
        raise ValueError(f"{type(model).__name__}: no parameter starts with its head prefixes {list(prefixes)}")
    return parts


def optimizer_groups(model: nn.Module, optim: OptimConfig, adapt: AdaptConfig) -> list[dict]:
    """AdamW groups: {backbone, head} × {decay (weight matrices), no decay (biases, norms, embeddings)}.

    Each group carries `lr` = optim.lr · its multiplier and `part`, `lr_mult` for the record; empty
    groups are left out. Frozen parameters are included (they are skipped while they have no gradient).
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mults = {BACKBONE: adapt.backbone_lr_mult, HEAD: adapt.head_lr_mult}
    groups = []
    for part, named in split_parameters(model).items():
        decay = [p for _, p in named if p.ndim > 1 and id(p) not in embedding_weights]
        no_decay = [p for _, p in named if not (p.ndim > 1 and id(p) not in embedding_weights)]
        for params, weight_decay in ((decay, optim.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": weight_decay, "lr": optim.lr * mults[part],
                               "lr_mult": mults[part], "part": part})
    return groups


def element_names(numbers) -> str:
    return ", ".join(f"{CHEMICAL_SYMBOLS[z] if 0 < z < len(CHEMICAL_SYMBOLS) else '?'} (Z={z})"
                     for z in numbers)


def check_new_species(data_elements, init_meta: dict, init: str, allow: bool) -> list[int]:
    """Atomic numbers of the finetune data missing from the export's species; ValueError unless `allow`."""
    new = sorted(set(int(z) for z in data_elements) - set(int(z) for z in init_meta["species"]))
    if new and not allow:
        raise ValueError(
            f"the finetune data has elements {element_names(new)} that the init export {init} was not "
            f"trained on (its species: {element_names(sorted(init_meta['species']))}); its embedding rows "
            f"for them are untrained. Finetune on data of those species only, or set "
            f"adapt.allow_new_species: true to start them from a freshly initialised embedding")
    return new


def reset_species_embedding(model: nn.Module, species: list[int]) -> None:
    """Redraw the species-embedding rows of `species` from N(0, 1) (nn.Embedding's initialisation)."""
    embedding = getattr(model, "species_embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no `species_embedding` (nn.Embedding indexed by Z): "
                         f"cannot initialise elements {element_names(species)}")
    with torch.no_grad():
        rows = torch.empty(len(species), embedding.embedding_dim, dtype=embedding.weight.dtype)
        nn.init.normal_(rows)
        embedding.weight[torch.tensor(species)] = rows.to(embedding.weight.device)


def reinit_heads(model: nn.Module) -> int:
    """Re-initialise every head module with its own `reset_parameters`; returns how many parameters."""
    head_names = {name for name, _ in split_parameters(model)[HEAD]}
    reset = set()
    for module_name, module in model.named_modules():
        own = {f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
        if own and own <= head_names and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            reset |= own
    if reset != head_names:
        raise ValueError(f"{type(model).__name__}: head parameters {sorted(head_names - reset)} belong to no "
                         f"module with reset_parameters(); cannot re-initialise them")
    return sum(p.numel() for name, p in model.named_parameters() if name in reset)


def adapt_loaded_model(model: nn.Module, adapt: AdaptConfig, new_species: list[int], init: str) -> None:
    """What happens to a model loaded from `init` before training: new species' embeddings, heads."""
    if new_species:
        reset_species_embedding(model, new_species)
        log.warning("elements %s are not in the species of %s: their embedding rows are freshly initialised "
                    "(adapt.allow_new_species)", element_names(new_species), init)
        if adapt.freeze_backbone_steps != 0:
            log.warning("adapt.freeze_backbone_steps=%d also freezes the species embedding: the new elements' "
                        "random embeddings stay untrained while the backbone is frozen",
                        adapt.freeze_backbone_steps)
    if adapt.reinit_heads:
        count = reinit_heads(model)
        log.info("re-initialised the output heads (%d parameters)", count)


class BackboneFreeze:
    """Backbone parameters take no gradient during steps 1..K (all steps for K = -1)."""

    def __init__(self, model: nn.Module, steps: int):
        self.steps = steps
        self.backbone = [p for _, p in split_parameters(model)[BACKBONE]] if steps else []
        self.frozen = False

    def before_step(self, step: int) -> None:
        """Call before computing optimizer step `step` (1-based)."""
        frozen = bool(self.backbone) and (self.steps == -1 or step <= self.steps)
        if frozen != self.frozen:
            for p in self.backbone:
                p.requires_grad_(not frozen)
            if not frozen:
                log.info("step %d: backbone unfrozen", step)
            self.frozen = frozen

    def release(self) -> None:
        """Make every parameter trainable again (the model leaves the training loop)."""
        for p in self.backbone:
            p.requires_grad_(True)
        self.frozen = False


class EarlyStopping:
    """Stop after `patience` consecutive validations without a new best (None: never), but not before step
    `min_steps`: while the learning rate is still high the validation error is noisy, and a plateau there is
    not convergence (a study run stopped at step 2,200 of a 6,000-step cosine, best at 1,700, 15% worse than
    the runs that went on).

    With `anneal_steps` > 0 the criterion does not end training at once: it starts an annealing tail, `anneal_steps`
    more steps with the learning rate on a half-cosine from its value at that step down to the schedule's floor
    (`lr_factor`), then training ends. A cosine schedule stopped early otherwise ends at a high learning rate
    and skips the annealing that runs reaching the cap get (two study runs stopped at step ~3,700 of 6,000, at a
    third of the peak learning rate, ended 4-7% worse than the runs that reached the cap)."""

    def __init__(self, patience: int | None, min_steps: int = 0, anneal_steps: int = 0):
        self.patience = patience
        self.min_steps = min_steps
        self.anneal_steps = anneal_steps
        self.stale = 0
        self.fired_at: int | None = None    # the step the criterion was met (checkpointed)

    def should_stop(self, improved: bool, step: int) -> bool:
        """After the validation of `step`: True when training ends here (the criterion met, no annealing tail)."""
        self.stale = 0 if improved else self.stale + 1
        if self.fired_at is not None:       # in the annealing tail: it runs to its end
            return False
        if self.patience is None or self.stale < self.patience or step < self.min_steps:
            return False
        self.fired_at = step
        return self.anneal_steps == 0

    def end_step(self, max_steps: int) -> int:
        """The last step of training as far as known now."""
        if self.fired_at is None or self.anneal_steps == 0:
            return max_steps
        return min(max_steps, self.fired_at + self.anneal_steps)

    def lr_factor(self, step: int, scheduled: Callable[[int], float], floor: float) -> float:
        """Multiplier of the peak learning rate after `step` steps: `scheduled(step)` until the criterion is met,
        then a half-cosine from its value there to `floor` over `anneal_steps` steps."""
        start = self.fired_at
        if start is None or self.anneal_steps == 0 or step <= start:
            return scheduled(step)
        at_start = scheduled(start)
        if at_start <= floor:               # already at the floor: never raise the learning rate
            return at_start
        # the schedules' half-cosine, started at `at_start` instead of the peak
        return at_start * lr_factor(step - start, at_start, floor, 0, self.anneal_steps)
