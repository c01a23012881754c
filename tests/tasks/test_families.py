"""The family registry the tasks dispatch through: look-ups, their errors, and one adapter per model type."""

from __future__ import annotations

from typing import get_args

import pytest

from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.models.tiny import tiny_config
from ecoflap_pl.tasks.families import (
    FAMILIES,
    FamilyAdapter,
    TaskKind,
    architectures,
    family_for,
    register_family,
    resolve_architecture,
)


def test_every_family_serves_known_tasks_with_its_prompts() -> None:
    for adapter in FAMILIES.values():
        assert set(adapter.model_classes) <= set(get_args(TaskKind)), adapter.model_type
        for task in ("vqa", "captioning"):
            assert (task in adapter.model_classes) == (task in adapter.prompts), (adapter.model_type, task)
        assert (adapter.towers is not None) == bool({"retrieval", "zero_shot"} & set(adapter.model_classes))


def test_the_generative_families_are_registered_from_their_descriptions() -> None:
    for name, family in GENERATIVE_FAMILIES.items():
        adapter = FAMILIES[name]
        assert adapter.model_classes == {"vqa": family.model_class, "captioning": family.model_class}
        assert adapter.prompts == {"vqa": family.vqa_prompt, "captioning": family.caption_prompt}


def test_lookups_list_the_families_of_the_task() -> None:
    assert family_for("blip-2", "retrieval").architecture == "blip2"
    assert architectures("nlvr2") == ("vilt",)
    with pytest.raises(ValueError, match=r"`model_type` must be one of \('vilt',\) for nlvr2, got 'clip'"):
        family_for("clip", "nlvr2")
    config = tiny_config("blip")
    assert resolve_architecture(None, config, "captioning")[0] == "blip"
    with pytest.raises(ValueError, match="`architecture` is 'blip2' but the model's model_type is 'blip'"):
        resolve_architecture("blip2", config, "captioning")


def test_a_model_type_is_registered_once() -> None:
    with pytest.raises(ValueError, match="model_type 'clip' is already registered"):
        register_family(FamilyAdapter("clip", "clip", {}))
