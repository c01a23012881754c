"""The registry of family adapters, keyed by Hugging Face ``model_type``, and the look-ups the tasks use."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

from ecoflap_pl.pruning.registry import Registry
from ecoflap_pl.tasks.families.adapter import FamilyAdapter, TaskKind

FAMILIES: Registry[FamilyAdapter] = Registry(
    "A family with model_type",
    "model_type",
    "a model_config dict needs its model_type (config.to_dict() includes it).",
)
"""``config.model_type`` -> its adapter, in registration order."""


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add ``adapter`` under its ``model_type``; a second adapter for the same type is refused."""
    return FAMILIES.add(adapter.model_type, adapter)


def serving(task: TaskKind) -> tuple[FamilyAdapter, ...]:
    """The registered families that serve ``task``."""
    return tuple(adapter for adapter in FAMILIES.values() if task in adapter.model_classes)


def architectures(task: TaskKind) -> tuple[str, ...]:
    """The ``architecture`` names of the families that serve ``task``."""
    return tuple(adapter.architecture for adapter in serving(task))


def model_type_of(architecture: str) -> str | None:
    """The ``model_type`` of the family an ``architecture`` name stands for."""
    return next((a.model_type for a in FAMILIES.values() if a.architecture == architecture), None)


def family_for(model_type: str | None, task: TaskKind) -> FamilyAdapter:
    """The adapter of ``model_type`` for ``task``.

    Raises:
        ValueError: no registered family of that type serves the task; the message lists those that do.
    """
    adapter = FAMILIES.get(model_type or "")
    if adapter is None or task not in adapter.model_classes:
        raise ValueError(
            f"The model's `model_type` must be one of {tuple(a.model_type for a in serving(task))} for {task}, got "
            f"{model_type!r}. HINT: {FAMILIES.hint}"
        )
    return adapter


def resolve_architecture(
    architecture: str | None, config: PretrainedConfig, task: TaskKind
) -> tuple[str, FamilyAdapter]:
    """``architecture`` if given (checked against the config), else the one the config's ``model_type`` names,
    with the family's adapter."""
    allowed: Sequence[str] = architectures(task)
    adapter = FAMILIES.get(config.model_type)
    inferred = adapter.architecture if adapter is not None and task in adapter.model_classes else None
    if architecture is None:
        if inferred is None or adapter is None:
            raise ValueError(
                f"`architecture` could not be inferred from the model's model_type {config.model_type!r}: it must "
                f"be one of {tuple(allowed)}. HINT: use a checkpoint of a supported architecture."
            )
        return inferred, adapter
    if architecture not in allowed:
        raise ValueError(f"`architecture` must be one of {tuple(allowed)}, got {architecture!r}.")
    if inferred != architecture or adapter is None:
        raise ValueError(
            f"`architecture` is {architecture!r} but the model's model_type is {config.model_type!r}. HINT: leave "
            "`architecture` unset to infer it, or give a model of that architecture."
        )
    return architecture, adapter
