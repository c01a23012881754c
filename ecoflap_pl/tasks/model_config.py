"""The config of the model a task builds, from a ``from_pretrained`` name or a config dict."""

from __future__ import annotations

from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from ecoflap_pl.models.loading import check_model_source, hub_load_errors
from ecoflap_pl.tasks.families.registry import FAMILIES, model_type_of


def load_config(
    pretrained: str | None,
    model_config: dict[str, Any] | PretrainedConfig | None,
    architecture: str | None = None,
    example: str = "Salesforce/blip2-opt-2.7b",
) -> PretrainedConfig:
    """The config of the model a task builds.

    Args:
        pretrained: a hub name or a local ``save_pretrained`` directory; its config is read with ``AutoConfig``.
        model_config: a config dict (``to_dict()`` of a config, with its ``model_type``) or a config object.
        architecture: used to pick the config class when ``model_config`` has no ``model_type``.
        example: the model named in the hint when neither or both sources are given.

    Raises:
        ValueError: not exactly one of ``pretrained`` and ``model_config``, or a dict whose type is unknown.
    """
    check_model_source(pretrained, model_config, example)
    if pretrained is not None:
        with hub_load_errors(pretrained):
            return AutoConfig.from_pretrained(pretrained)
    if isinstance(model_config, PretrainedConfig):
        return model_config
    if not isinstance(model_config, dict):
        raise TypeError(f"`model_config` must be a dict, got {type(model_config).__name__}.")
    model_type = model_config.get("model_type") or model_type_of(architecture or "")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"`model_config` must name its `model_type` (one of {sorted(FAMILIES)}), got "
            f"{model_config.get('model_type')!r}. HINT: pass a config's to_dict(), or set `architecture`."
        )
    return CONFIG_MAPPING[model_type].from_dict(model_config)
