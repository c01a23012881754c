"""The model families the tasks serve, one adapter each, registered by Hugging Face ``model_type``.

Adding a family is one adapter (a :class:`FamilyAdapter` instance, or a subclass where the family needs its own
processor, prompt encoding or towers) and one :func:`register_family` line below. A prompted generator whose own
processor expands the image tokens only needs an entry in
:data:`~ecoflap_pl.models.families.GENERATIVE_FAMILIES`.
"""

from ecoflap_pl.models.families import GENERATIVE_FAMILIES
from ecoflap_pl.tasks.families.adapter import FamilyAdapter, TaskKind
from ecoflap_pl.tasks.families.blip import BLIP
from ecoflap_pl.tasks.families.blip2 import BLIP2
from ecoflap_pl.tasks.families.clip import CLIP, SIGLIP
from ecoflap_pl.tasks.families.processor_encoded import ProcessorEncodedFamily
from ecoflap_pl.tasks.families.registry import (
    FAMILIES,
    architectures,
    family_for,
    model_type_of,
    register_family,
    resolve_architecture,
    serving,
)
from ecoflap_pl.tasks.families.towers import ImageFeatures, Towers
from ecoflap_pl.tasks.families.vilt import VILT

register_family(BLIP2)
register_family(BLIP)
register_family(VILT)
register_family(CLIP)
register_family(SIGLIP)
for _generative in GENERATIVE_FAMILIES.values():
    register_family(ProcessorEncodedFamily.of(_generative))

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "ImageFeatures",
    "ProcessorEncodedFamily",
    "TaskKind",
    "Towers",
    "architectures",
    "family_for",
    "model_type_of",
    "register_family",
    "resolve_architecture",
    "serving",
]
