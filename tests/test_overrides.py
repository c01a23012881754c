"""Every method of the package that overrides one of a Lightning class (Callback, LightningModule,
LightningDataModule, LightningCLI, Trainer) is marked ``@override``, so a hook renamed upstream fails type checking
instead of silently never being called."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

import ecoflap_pl
import ecoflap_pl.callbacks
import ecoflap_pl.datamodules

LIGHTNING_CLASSES = (Callback, pl.LightningModule, pl.LightningDataModule, LightningCLI, pl.Trainer)


def _modules() -> list[ModuleType]:
    packages = (ecoflap_pl, ecoflap_pl.callbacks, ecoflap_pl.datamodules)
    names = [
        info.name for package in packages for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    ]
    return [importlib.import_module(name) for name in names]


def _function(attribute: object) -> object:
    if isinstance(attribute, (staticmethod, classmethod)):
        return attribute.__func__
    return attribute.fget if isinstance(attribute, property) else attribute


def _overrides_without_marker(cls: type) -> list[str]:
    unmarked = []
    for name, attribute in vars(cls).items():
        function = _function(attribute)
        if name.startswith("__") or not callable(function):
            continue
        overridden = any(name in vars(base) for base in cls.__mro__[1:])
        if overridden and not getattr(function, "__override__", False):
            unmarked.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return unmarked


def test_every_lightning_override_is_marked() -> None:
    classes = {
        cls
        for module in _modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, LIGHTNING_CLASSES)
    }
    assert len(classes) >= 20  # the callbacks, DataModules, tasks, the CLI and the Trainer are all seen
    assert sorted(name for cls in classes for name in _overrides_without_marker(cls)) == []


def test_an_unmarked_override_is_found() -> None:
    class Unmarked(Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            """An override without the marker."""

        def own_helper(self) -> None:
            """Not an override: needs no marker."""

    assert _overrides_without_marker(Unmarked) == [f"{__name__}.{Unmarked.__qualname__}.on_fit_start"]
