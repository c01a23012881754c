"""Discovery of what to prune: stacks of transformer blocks and the Linear weights inside them.

Nothing here knows a model family. A *stack* is an ``nn.ModuleList``/``nn.Sequential`` of at least two blocks
of one class that contain Linear layers (ViT layers, T5 blocks, LLaMA layers, timm ``blocks``); the outermost
such containers are taken, so the sub-layers of a block never form a stack of their own. Stacks are ordered by
the order in which their first block runs during a real forward pass, recorded with pre-hooks.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ecoflap_pl.pruning.config import PruningConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One prunable weight: the ``weight`` of a Linear layer inside a block of a stack."""

    name: str
    block: str
    stack: str
    numel: int


@dataclass(frozen=True)
class Stack:
    """A sequence of same-class blocks, in the order the model runs them.

    ``calls_per_forward`` is how many times one forward pass runs the stack (2 for ViLT's NLVR2 head, which
    encodes each image with the text separately); every run's inputs count in the fine step's statistics.
    """

    name: str
    blocks: tuple[str, ...]
    calls_per_forward: int = 1


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(child, nn.Linear) for child in module.modules() if child is not module)


def _entries(container: nn.ModuleList | nn.Sequential) -> list[nn.Module]:
    """The container's entries by position, a block held at several positions as often as it is held
    (``children()`` yields each module once)."""
    return [container[index] for index in range(len(container))]


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    entries = _entries(module)
    return len(entries) >= 2 and len({type(entry) for entry in entries}) == 1 and _has_linear(entries[0])


def find_stacks(model: nn.Module) -> list[Stack]:
    """The outermost stacks of blocks in ``model``, in module-registration order."""
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        if any(name.startswith(stack.name + ".") for stack in stacks) or not _is_stack(module):
            continue
        prefix = f"{name}." if name else ""
        stacks.append(Stack(name, tuple(prefix + child for child, _ in module.named_children())))
    return stacks


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def find_candidates(model: nn.Module, stacks: list[Stack], config: PruningConfig) -> list[Candidate]:
    """The Linear weights inside the blocks of ``stacks`` selected by ``config.include``/``config.exclude``.

    Raises:
        ValueError: when no stack exists, or when the patterns leave nothing to prune.
    """
    if not stacks:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no discoverable stack of transformer blocks: no nn.ModuleList or "
            "nn.Sequential holds two or more blocks of one class containing nn.Linear layers. HINT: keep the blocks "
            "in an nn.ModuleList, as Hugging Face and timm models do."
        )
    modules = dict(model.named_modules())
    candidates = []
    computed: list[tuple[str, nn.Linear]] = []
    for stack in stacks:
        for block in stack.blocks:
            for sub_name, module in modules[block].named_modules(prefix=block):
                if not isinstance(module, nn.Linear):
                    continue
                name = f"{sub_name}.weight"
                if not _matches(name, config.include) or _matches(name, config.exclude):
                    continue
                if "weight" not in dict(module.named_parameters(recurse=False)):
                    computed.append((name, module))
                candidates.append(Candidate(name, block, stack.name, module.weight.numel()))
    _check_weights_stored(computed)
    _check_weights_not_shared(model, stacks, candidates)
    if not candidates:
        seen = [f"{stack.name} ({len(stack.blocks)} blocks)" for stack in stacks]
        raise ValueError(
            f"`include`={list(config.include)} and `exclude`={list(config.exclude)} select no weight to prune. "
            f"Stacks found: {seen}. HINT: patterns are globs on parameter names such as "
            f"'{stacks[0].blocks[0]}.*.weight'."
        )
    return candidates


def _check_weights_stored(computed: list[tuple[str, nn.Linear]]) -> None:
    """Refuse selected weights that are no parameter of their Linear but computed in each forward from others: a
    ``torch.nn.utils.prune`` mask (``weight_orig * weight_mask``) or a ``torch.nn.utils.parametrize`` parametrization.

    Pruning writes zeros into the stored weight, which such a forward would compute over; the model's own
    ``get_parameter`` had answered "`weight` is not an nn.Parameter", naming neither the weight nor the cause.

    Raises:
        ValueError: naming the weights and how their earlier pruning or parametrization is made permanent.
    """
    if not computed:
        return
    name, module = computed[0]
    if parametrize.is_parametrized(module, "weight"):
        cause = "a parametrization (torch.nn.utils.parametrize)"
        fix = "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
    elif hasattr(module, "weight_orig"):
        cause = "a torch.nn.utils.prune mask (weight_orig * weight_mask)"
        fix = "torch.nn.utils.prune.remove(module, 'weight') (its zeros then stay pruned)"
    else:
        cause = "other tensors"
        fix = "store it as an nn.Parameter named `weight`"
    more = f" (and {len(computed) - 1} more)" if len(computed) > 1 else ""
    raise ValueError(
        f"The weight {name}{more} is no parameter of its Linear but computed in each forward from {cause}: pruning "
        f"writes zeros into stored weights. HINT: make it a plain weight first, {fix} on each such Linear, or leave "
        f"it out with `exclude: ['{name}']`."
    )


def _check_weights_not_shared(model: nn.Module, stacks: list[Stack], candidates: list[Candidate]) -> None:
    """Refuse selected weights that several positions of the model share: a block held at several positions of its
    stack (ALBERT-style sharing across depths), or one Linear weight inside several blocks.

    Every weight is pruned once, from the inputs of the one position it holds: Wanda's and SparseGPT's statistics,
    the block-by-block replay and the per-block sparsities all assume it. A shared block ran more often than the
    others in the first forward pass, and ended in a misleading "did not run N time(s)"; a shared Linear was pruned
    twice under two names.

    Raises:
        ValueError: naming the shared block or weight, with the patterns that leave it out.
    """
    modules = dict(model.named_modules())
    selected_stacks = {candidate.stack for candidate in candidates}
    for stack in stacks:
        entries = _entries(modules[stack.name]) if stack.name in selected_stacks else []
        repeated = _first_repeat(id(entry) for entry in entries)
        if repeated is not None:
            prefix = f"{stack.name}." if stack.name else ""
            raise ValueError(
                f"The stack `{stack.name or type(model).__name__}` holds the same block object at positions "
                f"{repeated[0]} and {repeated[1]} (its weights are shared across depths): each weight is pruned once, "
                f"from the inputs of one position. HINT: leave the stack out with `exclude: ['{prefix}*']`, or give "
                "each position a block of its own."
            )
    repeated = _first_repeat(id(model.get_parameter(candidate.name)) for candidate in candidates)
    if repeated is not None:
        first, again = (candidates[index].name for index in repeated)
        raise ValueError(
            f"The weights {first} and {again} are one tensor, shared by two blocks: each weight is pruned once, from "
            f"the inputs of one position. HINT: leave one of them out with `exclude: ['{again}']`."
        )


def _first_repeat(keys: Iterable[int]) -> tuple[int, int] | None:
    """The positions of the first key met again in ``keys``: where it was first, and where it came again; None when
    every key differs."""
    first_at: dict[int, int] = {}
    for index, key in enumerate(keys):
        first = first_at.setdefault(key, index)
        if first != index:
            return first, index
    return None


def order_stacks(
    model: nn.Module, stacks: list[Stack], run_forward: Callable[[], Any]
) -> tuple[list[Stack], list[Stack]]:
    """Sort ``stacks`` by when their first block runs in ``run_forward()``; return (ran, never_ran).

    The stacks that ran come back with ``calls_per_forward`` set to the number of times their first block ran.
    """
    modules = dict(model.named_modules())
    first_call: dict[str, int] = {}
    call_counts: dict[str, int] = {}

    def recorder(stack_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            first_call.setdefault(stack_name, len(first_call))
            call_counts[stack_name] = call_counts.get(stack_name, 0) + 1

        return hook

    handles = [modules[stack.blocks[0]].register_forward_pre_hook(recorder(stack.name)) for stack in stacks]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    ran = [
        replace(stack, calls_per_forward=call_counts[stack.name])
        for stack in sorted((stack for stack in stacks if stack.name in first_call), key=lambda s: first_call[s.name])
    ]
    never_ran = [stack for stack in stacks if stack.name not in first_call]
    return ran, never_ran


def group_of(candidate: Candidate, granularity: str) -> str:
    """The group a candidate's sparsity is shared with: its block, itself, or its whole stack (tower)."""
    if granularity == "block":
        return candidate.block
    if granularity == "layer":
        return candidate.name
    return candidate.stack


def build_groups(candidates: list[Candidate], granularity: str) -> dict[str, tuple[str, ...]]:
    """Group name -> candidate parameter names, in candidate (forward) order."""
    groups: dict[str, list[str]] = {}
    for candidate in candidates:
        groups.setdefault(group_of(candidate, granularity), []).append(candidate.name)
    return {group: tuple(names) for group, names in groups.items()}
