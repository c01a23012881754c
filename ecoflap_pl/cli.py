"""``ecoflap``: the LightningCLI entry point of every job (prune, evaluate, fine-tune, predict).

``ecoflap validate -c configs/experiments/x.yaml`` prunes then evaluates, ``ecoflap fit`` prunes then fine-tunes
with the masks held fixed, ``ecoflap prune`` prunes and saves without evaluating or training. The pruning settings
are the ``pruning:`` section (the arguments of :class:`~ecoflap_pl.callbacks.ECoFLaPPruning`); the task's collator
(its processor and tokenizer) is linked into the DataModule, so datasets never load a model's processing.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.data import has_len
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_only
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from typing_extensions import override

# The demo's tasks and DataModules are imported so that their short names resolve as the library's do (`--model
# DemoVQATask`, `--model.help DemoVQATask`): jsonargparse finds a short name among the subclasses imported, so they
# were found only after a config had named one by its import path.
import ecoflap_pl.demo.datamodules  # noqa: F401
import ecoflap_pl.demo.tasks  # noqa: F401
from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.callbacks.checkpoint_file import check_checkpoint_file, use_whole_file_checkpoints
from ecoflap_pl.callbacks.export import saved_model_folder
from ecoflap_pl.callbacks.pruning import unreadable_checkpoint
from ecoflap_pl.cli_help import DESCRIPTION, SUBCOMMAND_HELP, describe_subcommand
from ecoflap_pl.console import quiet_libraries, warnings_in_one_line
from ecoflap_pl.datamodules import EcoflapDataModule
from ecoflap_pl.datamodules.base import Stage
from ecoflap_pl.entry_point import (
    SIGINT_STATUS,
    SIGTERM_STATUS,
    STOPPED_BY_SIGTERM,
    installed_versions,
    stopped_by_sigint,
)
from ecoflap_pl.export import check_writable_folder, has_saved_masks
from ecoflap_pl.hardware_check import check_model_placement, check_trainer_hardware
from ecoflap_pl.option_hints import (
    config_before_subcommand_hint,
    mapping_option_hint,
    missing_input_hint,
    unknown_class_hint,
    unknown_option_hint,
)
from ecoflap_pl.pruning.masks import masks_sparsity
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)

warn_on_rank_zero = rank_zero_only(log.warning)
"""``log.warning`` on global rank 0 only: under ``torchrun`` or ``srun`` every rank runs the whole command, and under
Lightning's own DDP launch the processes it starts run it again, so each would say the same warning. The rank is the
one :func:`_global_rank` reads."""


class EcoflapTrainer(pl.Trainer):
    """The Lightning ``Trainer`` plus :meth:`prune`, the ``ecoflap prune`` subcommand."""

    callbacks: list[Callback]  # set by Lightning's CallbackConnector; the Trainer class does not declare it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's arguments; checkpoints of a local folder are written whole (:func:`use_whole_file_checkpoints`)
        unless a strategy or plugin brings its own checkpoint IO."""
        super().__init__(*args, **kwargs)
        use_whole_file_checkpoints(self.strategy)

    def pruning_callback(self) -> ECoFLaPPruning:
        """The trainer's :class:`~ecoflap_pl.callbacks.ECoFLaPPruning` callback."""
        found = [callback for callback in self.callbacks if isinstance(callback, ECoFLaPPruning)]
        if len(found) != 1:
            raise ValueError(
                f"The Trainer must hold exactly one ECoFLaPPruning callback, got {len(found)}. HINT: configure it "
                "once, in the `pruning:` section of the config."
            )
        return found[0]

    def prune(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Prune the model and save it (``pruning.save_to``) without training or evaluating.

        Runs the ``fit`` lifecycle with zero optimizer steps, so pruning happens exactly as before fine-tuning:
        on the configured devices, under the configured strategy (DDP ranks share the calibration batches), with
        the report and the saved model written once pruning ends.

        Args:
            model: the task whose ``model`` is pruned.
            datamodule: the data, whose ``calibration_dataloader`` feeds pruning.
            ckpt_path: a checkpoint to start from (one that is already pruned is not pruned again), also one saved
                with ``save_weights_only``: no step uses the optimizer state it lacks.
            weights_only: how ``ckpt_path`` is loaded, as for ``fit`` (so that a config of ``fit`` runs ``prune``).
        """
        callback = self.pruning_callback()
        if TrainerFn.FITTING not in callback.stages:
            raise ValueError(
                "`ecoflap prune` prunes at the start of the fit stage, but `pruning.stages` is "
                f"{list(callback.stages)}. HINT: add 'fit' to pruning.stages."
            )
        if callback.save_to is None:
            warn_on_rank_zero("`pruning.save_to` is not set: the pruned model is only reported, not saved.")
        with _without_steps(self), warnings.catch_warnings(), _optimizer_state_optional(self._checkpoint_connector):
            # No step is taken: no advice on logging the steps of an epoch.
            warnings.filterwarnings("ignore", message="The number of training batches .* logging interval")
            self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)


@contextmanager
def _without_steps(trainer: EcoflapTrainer) -> Iterator[None]:
    """Make ``fit`` take no optimizer step and run no sanity check while the block runs, and give the Trainer's
    settings back after it (also on error): a ``fit`` of the same Trainer then trains as configured. The epoch limits
    are given back too: ``fit`` replaces unset ones by defaults that follow ``max_steps`` (-1, no limit, for 0)."""
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop
    settings = fit_loop.min_epochs, fit_loop.max_epochs, epoch_loop.max_steps, trainer.num_sanity_val_steps
    callbacks = trainer.callbacks
    epoch_loop.max_steps = trainer.num_sanity_val_steps = 0
    # No summary of a model about to be trained.
    trainer.callbacks = [callback for callback in callbacks if not isinstance(callback, ModelSummary)]
    try:
        yield
    finally:
        fit_loop.min_epochs, fit_loop.max_epochs, epoch_loop.max_steps, trainer.num_sanity_val_steps = settings
        trainer.callbacks = callbacks


class _OptionalOptimizerStateConnector(_CheckpointConnector):
    """Lightning's checkpoint connector that restores a checkpoint's optimizer and LR-scheduler state where it has
    any, and leaves the fresh ones of the run where it has none (a weights-only checkpoint), instead of raising."""

    @override
    def restore_optimizers_and_schedulers(self) -> None:
        if "optimizer_states" in self._loaded_checkpoint:
            super().restore_optimizers_and_schedulers()


@contextmanager
def _optimizer_state_optional(connector: _CheckpointConnector) -> Iterator[None]:
    """Let ``connector`` restore a checkpoint without optimizer state into ``fit`` while the block runs, no longer.

    Lightning's ``fit`` restores a checkpoint whole, and raises a KeyError for one that holds no optimizer and
    LR-scheduler state (``ModelCheckpoint(save_weights_only=True)``): resumed training needs them. ``prune`` runs
    ``fit`` with zero steps, so its optimizers are never used: such a checkpoint is restored as a full one is (the
    weights, the loops with the global step, the pruning state the task keeps in it), with the run's fresh
    optimizers. The connector's class is swapped for the block, not the connector: its state (the checkpoint being
    loaded, ``trainer.ckpt_path``) stays; a Trainer that ``ddp_spawn`` pickles into its processes takes the swap with
    it (a function set on the instance would be a closure, which does not pickle); and ``fit`` called afterwards
    refuses such a checkpoint again.
    """
    connector_class = type(connector)
    connector.__class__ = _OptionalOptimizerStateConnector
    try:
        yield
    finally:
        connector.__class__ = connector_class


_MAIN_LOOP: dict[str, Stage] = {"fit": "train", "prune": "train", "validate": "val", "test": "test", "predict": "test"}
"""The DataModule loop each subcommand runs (``prune`` runs ``fit`` with no step: it only calibrates)."""


def _collator(task: EcoflapTask) -> Callable[[list[dict[str, Any]]], Any]:
    return task.collator


class EcoflapCLI(LightningCLI):
    """LightningCLI with the pruning callback as a ``pruning:`` section, a ``prune`` subcommand and
    ``--compare_dense`` (evaluate the dense model first and print dense and pruned metrics side by side)."""

    trainer: EcoflapTrainer  # `build_cli` passes `trainer_class=EcoflapTrainer`

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Configuration errors are raised (not printed with the whole usage) so that `main` can show them briefly.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("description", DESCRIPTION)  # the subcommands' parsers get SUBCOMMAND_HELP
        parser = super().init_parser(**kwargs)
        parser.add_argument(
            "--version", action=_PrintVersions, help="Print the versions of ecoflap-pl and of its libraries"
        )
        return parser

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # Each subcommand's parser is described by SUBCOMMAND_HELP (a description given through `parser_kwargs`
        # still wins); Lightning lists the subcommands with its Trainer methods' first docstring lines whatever the
        # description, so the listing's entries are set to SUBCOMMAND_HELP once the parsers are added.
        kwargs = {name: {"description": SUBCOMMAND_HELP[name], **kwargs.get(name, {})} for name in self.subcommands()}
        super()._add_subcommands(parser, **kwargs)
        listing = parser._subcommands_action
        if listing is not None:
            for entry in listing._choices_actions:
                entry.help = SUBCOMMAND_HELP[entry.dest]

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        describe_subcommand(parser, subcommand)  # its --help in our words, not the Trainer method's docstring
        return parser

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Every rank of a `torchrun` or `srun` run parses the command line: what parsing prints (`--help`,
        # `--version`, `--print_config`) is printed on global rank 0 only.
        printed = nullcontext() if _global_rank() == 0 else redirect_stdout(io.StringIO())
        try:
            with printed:
                super().parse_arguments(parser, args)
        except ArgumentError as error:
            message = str(error)
            hint = (
                unknown_option_hint(message, parser)
                or unknown_class_hint(message)
                or mapping_option_hint(message)
                or missing_input_hint(message)
                or config_before_subcommand_hint(message)
            )
            if hint is None:
                raise
            raise ConfigurationError(f"{error}\n{hint}") from error  # its own line: the summary keeps it

    @override
    def instantiate_classes(self) -> None:
        self._instantiate_classes(splits_read=None)

    def _instantiate_classes(self, splits_read: EcoflapDataModule | None) -> None:
        """Check the settings, read the data (unless ``splits_read`` holds the splits already), then build the task,
        the DataModule and the Trainer."""
        try:
            if self.subcommand is not None:
                check_trainer_hardware(self._get(self.config, "trainer"))
                _check_no_pruning_callback_in_trainer(self._get(self.config, "trainer"))
                _check_default_root_dir(self._get(self.config, "trainer"))
                check_model_placement(_model_arguments(self.config.get(self.subcommand)))
                # Every pruning setting (semi_structured on a machine without a GPU too) is checked by building the
                # callback, which costs nothing, before the data is read and the model built (it is built after them).
                self._pruning_callback()
            checked = self._read_data_first() if splits_read is None else splits_read
            super().instantiate_classes()
            if checked is not None and isinstance(self.datamodule, EcoflapDataModule):
                self.datamodule.reuse_splits(checked)
        except (ValueError, TypeError, OSError, MisconfigurationException) as error:
            raise ConfigurationError(str(error)) from error

    def _read_data_first(self) -> EcoflapDataModule | None:
        """Read the splits the run will read before the task builds its model (minutes for a large one), so that a
        wrong ``data_dir``, a missing, damaged or malformed annotation file, a missing image folder or image file is
        reported at once; return the DataModule holding them, whose splits the run's DataModule then reuses.

        The DataModule is built from its configuration without the task's collator (the link that sets it needs the
        model). For the subcommand's main loop, and the training split when the pruning callback will draw
        calibration batches from it first, :meth:`~ecoflap_pl.datamodules.EcoflapDataModule.check_files` finds every
        file (so a missing one is named before any file is parsed), then
        :meth:`~ecoflap_pl.datamodules.EcoflapDataModule.dataset` reads each split: the parse ``setup`` would do
        after the model is built, moved before it, not repeated (the demo DataModules build their data when
        constructed, on first use, as the task would before them). A DataModule taking class arguments
        (``class_path`` values, which only the parser instantiates) is left to be checked when its loop starts.
        """
        data = self._get(self.config, "data") if self.subcommand is not None else None
        if data is None:
            return None
        init_args = data.init_args.as_dict() if data.get("init_args") is not None else {}
        init_args.pop("collate_fn", None)
        if any(isinstance(value, dict) and "class_path" in value for value in init_args.values()):
            return None
        datamodule = instantiate_class((), {"class_path": data.class_path, "init_args": init_args})
        if not isinstance(datamodule, EcoflapDataModule):
            return None
        loops = self._loops_read()
        for stage in loops:
            files = datamodule.check_files(stage)
            log.debug("The %s loop reads %s", stage, ", ".join(f"{key}={path}" for key, path in files.items()))
        for stage in loops:
            datamodule.dataset(stage)
        return datamodule

    def _loops_read(self) -> list[Stage]:
        """The DataModule loops the subcommand reads: its main loop; for ``fit``, the validation split unless
        ``trainer.limit_val_batches`` is 0 (the sanity check reads it after pruning); and the training split for
        calibration when it prunes first (the subcommand is in ``pruning.stages``, ``ckpt_path`` not pruned)."""
        main_loop = _MAIN_LOOP[str(self.subcommand)]
        if main_loop == "train":
            limit_val_batches = self._get(self.config, "trainer").get("limit_val_batches")
            return [main_loop] if limit_val_batches == 0 else [main_loop, "val"]
        if self.subcommand not in self._get(self.config, "pruning").stages or self._starts_pruned():
            return [main_loop]
        return [main_loop, "train"]

    def _pruning_callback(self) -> ECoFLaPPruning:
        """The pruning callback that the ``pruning:`` section configures, built from the parsed settings without
        jsonargparse's meta keys: a section given as a file of its own (``--pruning FILE``) carries its ``__path__``,
        which the callback does not take."""
        return ECoFLaPPruning(**self._get(self.config, "pruning").clone(with_meta=False).as_dict())

    def _starts_pruned(self) -> bool:
        """Whether the run starts from a pruned model, which is not pruned again: a ``pretrained`` folder that
        ``save_to`` wrote (unless ``pruning.reuse_saved_masks`` is off), or a ``ckpt_path`` that may hold one (a path
        that is not a file, such as ``last``, counts as one: the check must not refuse a run that would not read the
        training split)."""
        callback = self._pruning_callback()
        if callback.reuse_saved_masks and _saved_pretrained(self.config.get(self.subcommand)) is not None:
            return True
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path is None:
            return False
        return not Path(ckpt_path).is_file() or callback.checkpoint_is_pruned(ckpt_path)

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads `ckpt_path` here to replace the model's arguments by the checkpoint's hyperparameters.
        # Say which arguments of the config that replaces, and turn an unreadable file into a one-line error.
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        before, task = _model_arguments(settings), _model_class(settings)
        is_file = ckpt_path is not None and Path(ckpt_path).expanduser().is_file()
        if ckpt_path is not None:
            _check_ckpt_path_exists(str(ckpt_path))
        try:
            if is_file:
                _check_checkpoint_file(str(ckpt_path), str(subcommand))  # before the model is built
            super()._parse_ckpt_path()
        except Exception as error:  # torch raises several types for a file that is not a checkpoint
            if isinstance(error, ArgumentError | ConfigurationError):
                raise
            raise ConfigurationError(str(unreadable_checkpoint(ckpt_path, error))) from error
        settings = self.config.get(subcommand) if subcommand else None
        if _model_class(settings) != task:
            # Lightning would silently build the checkpoint's task instead of the config's: another model, data
            # that does not fit it, and metrics of another kind.
            raise ConfigurationError(_other_task_message(repr(ckpt_path), _model_class(settings), task))
        after = _model_arguments(settings)
        replaced = {key: (before[key], after.get(key)) for key in before if before[key] != after.get(key)}
        if replaced:
            warn_on_rank_zero(
                "The checkpoint's hyperparameters replace these model arguments of the config: %s. The model is "
                "rebuilt as it was trained, so that the checkpoint's weights fit it.",
                ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in sorted(replaced.items())),
            )

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in ("validate", "test") and self._get(self.config, "compare_dense"):
            warn_on_rank_zero(
                "`compare_dense` is ignored by `%s`: it evaluates the dense model beside the pruned one in `validate` "
                "and `test` only. HINT: run `ecoflap validate` (or `test`) with this config to compare them; set "
                "compare_dense false to leave this out.",
                subcommand,
            )
        try:
            self._resolve_ckpt_path(subcommand)
            self._check_before_launch(subcommand)
        except (ValueError, TypeError, OSError, AttributeError) as error:
            raise ConfigurationError(str(error)) from error
        super()._run_subcommand(subcommand)

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        """Resolve a ``ckpt_path`` that Lightning finds itself (``last``, ``best``, ``hpc``, a model registry name)
        with the Trainer's own resolution, give the file it finds the checks a ``ckpt_path`` file gets (whole,
        resumable by ``fit``, written by the config's task) and its hyperparameters
        (:meth:`_rebuild_as_trained`), and run with that file, so that the checks after this one (pruned or not,
        ``save_to``) read it too and Lightning does not resolve it again.

        Lightning resolves these names from the Trainer's checkpoint callbacks and loggers (``last``: the newest
        ``last*.ckpt`` in their folders), which LightningCLI builds together with the model: this runs once the model
        is built, before the run starts (before pruning, and before a strategy starts its processes). Where Lightning
        finds no file (``last`` before any checkpoint was saved), it warns as always and the run starts without one.

        Raises:
            ValueError: Lightning finds no checkpoint for the name (``best`` without a best model, ``hpc`` without an
                HPC checkpoint; ``last`` where an earlier run's last checkpoint is in a folder Lightning does not
                search), or the file it finds is refused.
        """
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path is None or Path(str(ckpt_path)).expanduser().is_file() or "://" in str(ckpt_path):
            return
        function = TrainerFn.FITTING if subcommand == "prune" else TrainerFn(subcommand)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            resolved = self.trainer._checkpoint_connector._select_ckpt_path(
                function, ckpt_path, model_provided=True, model_connected=self.trainer.lightning_module is not None
            )
        if resolved is None and ckpt_path == "last":
            _check_no_unseen_last_checkpoint(Path(self.trainer.default_root_dir))  # instead of Lightning's warning
        for warning in said:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if resolved is not None and not Path(str(resolved)).is_file():
            return  # a name Lightning left as it is (a registry name without `litmodels`): Lightning reports it
        if resolved is not None:
            log.info("`ckpt_path` %r is %s", ckpt_path, resolved)
            checkpoint = _check_checkpoint_file(str(resolved), subcommand)
            task, written_by = _model_class(self.config.get(subcommand)), _checkpoint_task(checkpoint)
            if written_by is not None and written_by != task:
                raise ValueError(_other_task_message(f"{ckpt_path!r} ({resolved})", written_by, task))
        self.config[subcommand]["ckpt_path"] = self.config_init[subcommand]["ckpt_path"] = resolved
        if resolved is not None:
            self._rebuild_as_trained(subcommand)

    def _rebuild_as_trained(self, subcommand: str) -> None:
        """Give the file a Lightning name resolved to what LightningCLI gives a ``ckpt_path`` file before it builds
        the model: its hyperparameters replace the config's model arguments (a warning names them). Where they
        replace any, the run is built again from the new config, as it would be given the file (seeded again, the
        splits already read reused): the model first built is not the one the checkpoint was written by (another
        width fails to restore; another argument changes the model without a word)."""
        settings = self.config.get(subcommand)
        before = (_model_class(settings), _model_arguments(settings))
        self._parse_ckpt_path()
        settings = self.config.get(subcommand)
        if (_model_class(settings), _model_arguments(settings)) == before:
            return
        splits_read = self.datamodule if isinstance(self.datamodule, EcoflapDataModule) else None
        del self.model, self.trainer, self.config_init  # the first model, freed before the second is built
        self._set_seed()
        self.before_instantiate_classes()
        self._instantiate_classes(splits_read)
        self.after_instantiate_classes()

    def _check_before_launch(self, subcommand: str) -> None:
        """Under a strategy that starts processes (DDP on several devices), run the pruning callback's checks before
        they start, in this one process: started, every process would run them and print the same refusal, once per
        rank. ``setup``'s checks (``save_to``, ``report_dir``, the selected weights, ...); for ``fit`` and ``prune``, a
        ``save_to`` holding an export that the run would replace though it does not continue the run that wrote it
        (read from the ``ckpt_path`` file, which ``on_fit_start`` checks only once it is restored); and the
        calibration batches' sizes against the number of ranks, left out when the run does not prune (the subcommand
        is not in ``pruning.stages``, or ``ckpt_path`` may hold a pruned model).
        """
        if self.trainer.strategy.launcher is None:
            return  # one process: the checks run once, in `setup` and when pruning starts
        callback = self.trainer.pruning_callback()
        stage = TrainerFn.FITTING.value if subcommand == "prune" else subcommand
        callback.setup(self.trainer, self.model, stage)
        if stage == TrainerFn.FITTING.value:
            ckpt_path = self._get(self.config, "ckpt_path")
            checkpoint = ckpt_path if ckpt_path is not None and Path(ckpt_path).is_file() else None
            callback.check_save_to_before_fit(self.model, checkpoint)
        if stage in callback.stages and not self._starts_pruned():
            callback.check_save_to_before_pruning(self.model)  # `setup` leaves a folder holding an export for later
            callback.check_calibration_data(self.datamodule, self.trainer.world_size)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "prune": {"model", "datamodule"}}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ECoFLaPPruning, "pruning")
        parser.link_arguments("model", "data.init_args.collate_fn", compute_fn=_collator, apply_on="instantiate")
        parser.add_argument(
            "--compare_dense",
            type=bool,
            default=False,
            help="validate/test: evaluate the dense model first, then prune and evaluate again, and print both. With "
            "a pruned --ckpt_path: the model the config builds (dense), then the checkpoint as it is.",
        )

    def validate(self, **kwargs: Any) -> None:
        self._evaluate(self.trainer.validate, **kwargs)

    def test(self, **kwargs: Any) -> None:
        self._evaluate(self.trainer.test, **kwargs)

    def _evaluate(self, run: Callable[..., list[Mapping[str, float]]], **kwargs: Any) -> None:
        limit = self.trainer.limit_val_batches if self.subcommand == "validate" else self.trainer.limit_test_batches
        if limit == 0:
            raise ConfigurationError(
                f"`trainer.limit_{'val' if self.subcommand == 'validate' else 'test'}_batches` is 0, so "
                f"`{self.subcommand}` would evaluate nothing and prune nothing. HINT: remove it, or run "
                "`ecoflap prune` to prune without evaluating."
            )
        if not self._get(self.config, "compare_dense"):
            run(**kwargs)
            return
        callback = self.trainer.pruning_callback()
        saved = saved_model_folder(getattr(self.model, "model", self.model)) if callback.reuse_saved_masks else None
        if saved is not None:
            raise ValueError(
                f"`compare_dense` needs a dense model, but the model given is already pruned: `pretrained` {saved} "
                "is a model saved with its masks. HINT: point `pretrained` at the dense model it was pruned from "
                "(the pruned run then prunes it as configured), or drop --compare_dense."
            )
        ckpt_path = kwargs.get("ckpt_path")
        pruned_checkpoint = (
            ckpt_path is not None and Path(ckpt_path).is_file() and callback.checkpoint_is_pruned(ckpt_path)
        )
        if not pruned_checkpoint and self.subcommand not in callback.stages:
            warn_on_rank_zero(
                "`compare_dense` has nothing to compare: `pruning.stages` is %s, so `%s` does not prune. The model is "
                "evaluated once, dense. HINT: add '%s' to pruning.stages.",
                list(callback.stages),
                self.subcommand,
                self.subcommand,
            )
            run(**kwargs)
            return
        if pruned_checkpoint or ckpt_path is None:
            _check_dense(self.model)  # the dense column is the model the config builds: it must be dense
        if pruned_checkpoint:
            # The dense model is the one the config builds (`pretrained`), before the pruned checkpoint is loaded;
            # the pruned run then loads the checkpoint, whose restored masks keep it from being pruned again.
            dense_kwargs, pruned_kwargs = {**kwargs, "ckpt_path": None}, kwargs
        else:
            # A dense (or no) checkpoint: evaluate it, then prune those same weights and evaluate again.
            dense_kwargs, pruned_kwargs = kwargs, {**kwargs, "ckpt_path": None}
            if callback.pruned:
                raise ValueError("`compare_dense` needs a dense model, but the model given is already pruned.")
        # One table of both runs below, not one per run.
        dense_kwargs, pruned_kwargs = {**dense_kwargs, "verbose": False}, {**pruned_kwargs, "verbose": False}
        # The dense run goes without the callback, so its fail-fast checks (save_to, 2:4 kernels, strategy) run
        # here: a refusal must come before the dense evaluation's minutes of work, not after them.
        callback.setup(self.trainer, self.model, self.subcommand)
        if not pruned_checkpoint and self.subcommand in callback.stages:
            callback.check_save_to_before_pruning(self.model)  # `setup` leaves a folder holding an export for later
        self.trainer.callbacks.remove(callback)
        try:
            dense = run(**dense_kwargs)
        finally:
            self.trainer.callbacks.append(callback)
        pruned = run(**pruned_kwargs)
        if self.trainer.is_global_zero:
            notes = pruned_notes(callback)
            if pruned_checkpoint:
                notes.append("dense: the model the config builds, without the checkpoint")
            notes.extend(_part_of_split_note(self.trainer, "val" if self.subcommand == "validate" else "test"))
            sparsity = (
                callback.result.overall_sparsity if callback.result is not None else masks_sparsity(callback.masks)
            )
            Console().print(comparison_table(dense[0] if dense else {}, pruned[0] if pruned else {}, sparsity, notes))


def _check_no_pruning_callback_in_trainer(trainer_settings: Any) -> None:
    """Refuse an :class:`~ecoflap_pl.callbacks.ECoFLaPPruning` under ``trainer.callbacks`` (where a plain LightningCLI
    config puts its callbacks) before anything is built: the command adds its own from the ``pruning:`` section, and
    Lightning refused the second one when it built the Trainer, with a traceback ("Found more than one stateful
    callback of type `ECoFLaPPruning`").

    Raises:
        ConfigurationError: naming the ``trainer.callbacks`` entry.
    """
    callbacks = trainer_settings.get("callbacks") if trainer_settings is not None else None
    listed: list[Any] = callbacks if isinstance(callbacks, list) else [callbacks]
    for callback in listed:
        class_path = callback.get("class_path") if hasattr(callback, "get") else None
        module_name, _, name = str(class_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, ECoFLaPPruning):
            raise ConfigurationError(
                f"`trainer.callbacks` holds {class_path}, but the pruning callback is configured by the `pruning:` "
                "section, which adds it to every run. HINT: remove it from trainer.callbacks and put its init_args "
                "under `pruning:` (`ecoflap validate --help` lists them)."
            )


def _check_default_root_dir(trainer_settings: Any) -> None:
    """Check that the run's folder, ``trainer.default_root_dir`` (default: the working directory), can be written,
    where the Trainer writes there: the ``config.yaml`` of every run and, with the default logger or none, the logs
    and checkpoints (a logger of its own writes where its ``save_dir`` says). Lightning first writes it once the data
    is read and the model built (minutes for a large one), and a folder it cannot make was only "[Errno 20] Not a
    directory: ...", without the option.

    Raises:
        FileExistsError: the folder or one of its parents is a file.
        PermissionError: it cannot be written.
    """
    if trainer_settings is None or not isinstance(trainer_settings.get("logger"), bool | None):
        return
    root = trainer_settings.get("default_root_dir") or os.getcwd()
    if "://" not in str(root):  # a remote folder is Lightning's to reach
        check_writable_folder(root, option="trainer.default_root_dir")


_CKPT_PATH_WORDS = ("last", "best", "hpc")
"""``ckpt_path`` values that name no file: Lightning finds the checkpoint itself."""


def _check_ckpt_path_exists(ckpt_path: str) -> None:
    """Refuse a local ``ckpt_path`` that is no file before the model is built (Lightning finds out when the run
    restores it, after the model is built and, for ``validate``, after pruning). Lightning's words (``last``, ...), a
    model registry name and a remote URL are left to Lightning.

    Raises:
        ConfigurationError: the path does not exist, or is a folder.
    """
    if ckpt_path in _CKPT_PATH_WORDS or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return
    path = Path(ckpt_path).expanduser()
    if path.is_file():
        return
    found = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
    raise ConfigurationError(
        f"`ckpt_path` {ckpt_path!r} {found}. HINT: give a .ckpt file a run saved (under its "
        "`trainer.default_root_dir`, in lightning_logs/version_N/checkpoints/ with the default logger), or 'last' to "
        "resume from the newest checkpoint there."
    )


def _check_checkpoint_file(ckpt_path: str, subcommand: str) -> Any:
    """The checks of a ``ckpt_path`` file before it is restored: whole (its checksums), a readable checkpoint, and
    for ``fit`` one that can be resumed: Lightning finds out that a weights-only checkpoint
    (``ModelCheckpoint(save_weights_only=True)``) cannot only when it restores the optimizers, after the model is
    built and restored, with a traceback (``prune``, which takes no step, restores it without optimizer state:
    :meth:`EcoflapTrainer.prune`). Return the checkpoint, read memory-mapped: the weights are not loaded.

    Raises:
        ConfigurationError: the file is damaged or not a readable checkpoint, or ``fit`` cannot resume it.
    """
    try:
        check_checkpoint_file(ckpt_path)  # before any of it is loaded
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # torch raises several types for files that are not checkpoints
        raise ConfigurationError(str(unreadable_checkpoint(ckpt_path, error))) from error
    if subcommand == "fit" and isinstance(checkpoint, dict) and "optimizer_states" not in checkpoint:
        raise ConfigurationError(
            f"`ckpt_path` {ckpt_path!r} holds the weights only (`ModelCheckpoint(save_weights_only=True)`), without "
            "the optimizer state that `fit` resumes. HINT: resume from a checkpoint saved without save_weights_only, "
            "or evaluate this one with `ecoflap validate` or `ecoflap test --ckpt_path` (its masks come with it), or "
            "save it with `ecoflap prune --ckpt_path` (--pruning.save_to DIR) and fine-tune DIR."
        )
    return checkpoint


def _check_no_unseen_last_checkpoint(root: Path) -> None:
    """Refuse ``ckpt_path: last`` where Lightning found no last checkpoint but an earlier run saved one under
    ``root`` (the Trainer's ``default_root_dir``). Lightning searches only the folders this run's checkpoint callbacks
    save to; with a logger and a ``ModelCheckpoint`` without ``dirpath``, that is a new version folder each run, so the
    run would start over, with Lightning's hint to set ``save_last=True`` (set already). The search by hand matches
    Lightning's ``last`` names (``last.ckpt``, ``last-N.ckpt``); Lightning's own search is private to its callback.

    Raises:
        ValueError: naming the newest such checkpoint.
    """
    earlier = sorted(
        (path for path in root.rglob("last*.ckpt") if re.fullmatch(r"last(-\d+)?", path.stem)),
        key=lambda path: path.stat().st_mtime,
    )
    if not earlier:
        return
    others = f" (and {len(earlier) - 1} older)" if len(earlier) > 1 else ""
    raise ValueError(
        f"`ckpt_path` 'last' finds no checkpoint in the folder this run saves checkpoints to, but an earlier run "
        f"saved {earlier[-1]}{others}: with a logger, a ModelCheckpoint without `dirpath` saves each run in a new "
        f"version folder. HINT: resume from that file (--ckpt_path {earlier[-1]}), or give the ModelCheckpoint a "
        "`dirpath` (as the *_finetune experiments do) so that every run saves in one folder."
    )


def _checkpoint_task(checkpoint: Any) -> str | None:
    """The task class that wrote ``checkpoint``, as LightningCLI stores it in its hyperparameters (``None`` where
    they do not name it)."""
    hyperparameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    task = hyperparameters.get("_class_path") if isinstance(hyperparameters, dict) else None
    return task if isinstance(task, str) else None


def _other_task_message(ckpt_path: str, written_by: str | None, task: str | None) -> str:
    return (
        f"`ckpt_path` {ckpt_path} was written by the task {written_by}, but the config's model is {task}. HINT: pass "
        f"a checkpoint of {task}, or use this one with the config it was trained with."
    )


def pruned_notes(callback: ECoFLaPPruning) -> list[str]:
    """What the pruned column of the comparison is of: where its masks came from, the zeros the model had before
    pruning (counted in its sparsity), and the training a checkpoint's weights had after pruning."""
    notes = [f"pruned: masks from {callback.masks_from}"]
    result = callback.result
    if result is not None and result.prior_sparsity:
        notes.append(
            f"pruned: {100 * result.prior_sparsity:.1f}% of the candidate weights were zero before pruning, counted "
            "in its sparsity"
        )
    if callback.fine_tuned_to_step is not None:
        steps = callback.fine_tuned_to_step
        notes.append(f"pruned: fine-tuned after pruning, to training step {steps} (the masks held fixed)")
    return notes


def _part_of_split_note(trainer: pl.Trainer, split: str) -> list[str]:
    """A note when ``limit_val_batches`` / ``limit_test_batches`` (``split`` "val" or "test") kept both runs to part
    of the split, whose metrics would otherwise read as the whole split's.

    The limit and the loaders' lengths are each rank's: under DDP every rank evaluates that many batches of its own
    share (the distributed sampler deals the samples out in turn, so together they are the split's first batches)."""
    limit = getattr(trainer, f"limit_{split}_batches")
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return []
    batches = sum(getattr(trainer, f"num_{split}_batches"))
    loaders = getattr(trainer, f"{split}_dataloaders")
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    if all(has_len(loader) for loader in loaders) and batches >= sum(len(loader) for loader in loaders):
        return []  # a limit above the split's length
    ranks = trainer.world_size
    each = f", {batches} on each of the {ranks} ranks" if ranks > 1 else ""
    setting = f"`trainer.limit_{split}_batches` {limit}"
    return [f"both: the first {batches * ranks} batches of the {split} split{each} ({setting})"]


def comparison_table(
    dense: Mapping[str, float], pruned: Mapping[str, float], sparsity: float, notes: Sequence[str] = ()
) -> Group:
    """Dense and pruned metrics side by side, with the difference: a title line, the table, then ``notes``, one a line.

    The title and notes are lines of their own, not the table's title and caption, which rich wraps to the width of
    the table's four short columns (a checkpoint's path was cut in two).
    """
    title = Text(f"Dense vs pruned ({100 * sparsity:.1f}% of the candidate weights pruned)", style="italic")
    table = Table()
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("Δ", justify="right")
    for key in sorted(set(dense) | set(pruned)):
        before, after = dense.get(key), pruned.get(key)
        delta = f"{after - before:+.4f}" if before is not None and after is not None else ""
        table.add_row(key, _fmt(before), _fmt(after), delta)
    return Group(title, table, *(Text(note) for note in notes))


def _model_arguments(settings: Any) -> dict[str, Any]:
    """The model's ``init_args`` of one subcommand's settings, as a plain dict (empty when there are none)."""
    model = settings.get("model") if settings is not None else None
    init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
    if init_args is None:
        return {}
    return init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)


def _saved_pretrained(settings: Any) -> Path | None:
    """The ``save_to`` folder (with its masks) that the model of one subcommand's settings loads: ``pretrained``, or
    the folder of a timm model's ``model_config.pretrained_cfg_overlay.file``; ``None`` for any other model."""
    arguments = _model_arguments(settings)
    pretrained = arguments.get("pretrained")
    overlay = (arguments.get("model_config") or {}).get("pretrained_cfg_overlay") or {}
    timm_file = overlay.get("file") if pretrained is True else None  # timm reads it when pretrained
    folders = [Path(pretrained).expanduser()] if isinstance(pretrained, str) and pretrained else []
    if isinstance(timm_file, str) and timm_file:
        folders.append(Path(timm_file).expanduser().parent)
    return next((folder for folder in folders if has_saved_masks(folder)), None)


def _model_class(settings: Any) -> str | None:
    """The model's ``class_path`` in one subcommand's settings (``None`` when there is none)."""
    model = settings.get("model") if settings is not None else None
    return model.get("class_path") if model is not None and hasattr(model, "get") else None


def _check_dense(model: Any, limit: float = 0.01) -> None:
    """Refuse ``compare_dense`` when the Linear weights of the model the config builds are already >= 1% zeros."""
    weights = [module.weight for module in model.modules() if isinstance(module, nn.Linear)]
    zeros = sum(int((p == 0).sum()) for p in weights) / max(sum(p.numel() for p in weights), 1)
    if zeros >= limit:
        raise ValueError(
            f"`compare_dense` needs the dense model, but {100 * zeros:.1f}% of the weights of the model the config "
            "builds are already zero (pruned before). HINT: point `pretrained` at the dense model it was pruned from, "
            "or drop --compare_dense."
        )


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def build_cli(args: list[str] | None = None, **kwargs: Any) -> EcoflapCLI:
    """The ``ecoflap`` CLI over ``args``: any task and DataModule by ``class_path``, the ``EcoflapTrainer``.

    Args:
        args: command-line arguments (``None``: ``sys.argv``).
        **kwargs: further ``LightningCLI`` arguments, e.g. ``run=False`` to build the run without starting it.
    """
    return EcoflapCLI(
        EcoflapTask,
        EcoflapDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=EcoflapTrainer,
        args=args,
        **kwargs,
    )


class ConfigurationError(ValueError):
    """A value of the configuration was refused while building the task, the DataModule, the Trainer or a callback."""


USER_ERRORS = (
    ArgumentError,
    MisconfigurationException,
    ValueError,
    TypeError,
    OSError,
    FloatingPointError,
    ImportError,
)
"""What ``main`` reports in a few lines: bad options and files, bad data, refused settings. Every other exception (a
bug) keeps its traceback; so does every error with ``ECOFLAP_DEBUG=1``."""


def main(args: list[str] | None = None) -> None:
    """The ``ecoflap`` command: ``ecoflap {fit,validate,test,predict,prune} -c CONFIG.yaml`` (its console script is
    :func:`ecoflap_pl.entry_point.main`).

    A refused configuration, bad data or a missing file ends the run with its message (and the option it names) in
    a few lines (on global rank 0; one line on the others, which give rank 0 time to print it:
    :func:`refusal_on_this_rank`, :func:`_rank_0_refusal_wait`) and exit status 2; SIGTERM
    ends it with status 143, SIGINT (Ctrl+C) with 130. ``ECOFLAP_DEBUG=1`` shows the full traceback.
    """
    try:
        # The refusal below is printed inside the handler too: a SIGTERM while it is printed (``torchrun`` stopping
        # this rank once another one has failed) killed the process without its line, status -15.
        with _sigterm_raises():
            _run_command(args)
    except SIGTERMException:
        log.warning(STOPPED_BY_SIGTERM)
        sys.exit(SIGTERM_STATUS)


def _run_command(args: list[str] | None) -> None:
    """The command of :func:`main`, its refusals printed and turned into exit statuses."""
    quiet_libraries()
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        # `ECOFLAP_DEBUG=1` keeps Python's format of warnings: where each was raised.
        with nullcontext() if os.environ.get("ECOFLAP_DEBUG") else warnings_in_one_line():
            build_cli(args, save_config_kwargs={"overwrite": True})
    except KeyboardInterrupt:
        stopped_by_sigint()
    except SystemExit as exit_:
        if exit_.code == 1 and isinstance(exit_.__context__, KeyboardInterrupt):
            # Lightning ends a Ctrl+C inside its loops with `sys.exit(1)`, once it has said so and torn the run down.
            sys.exit(SIGINT_STATUS)
        raise
    except USER_ERRORS as error:
        if os.environ.get("ECOFLAP_DEBUG"):
            raise
        wait_s = _rank_0_refusal_wait()
        Console(stderr=True, soft_wrap=True).print(refusal_on_this_rank(error), markup=False, highlight=False)
        time.sleep(wait_s)
        sys.exit(2)


RANK_0_REFUSAL_WAIT_S = 10.0
"""How long a rank other than 0 that refused the run waits before it exits (see :func:`_rank_0_refusal_wait`)."""


def _rank_0_refusal_wait() -> float:
    """How long this rank waits once it has printed its refusal: :data:`RANK_0_REFUSAL_WAIT_S` on a rank other than 0,
    where a SIGTERM from now on ends the process with the refusal's status 2 and no other line; none on rank 0.

    ``torchrun`` stops every rank once one has exited with an error. Every rank runs the same config and meets the
    same refusal, but not at the same moment: where another rank exited first, rank 0 was stopped before it printed
    the whole message (the HINT included) that the other ranks' one line points to. The wait lets rank 0 print it;
    its exit then makes the launcher stop this rank, whose line is said.
    """
    if _global_rank() == 0 or threading.current_thread() is not threading.main_thread():
        return 0.0

    def refused(signum: int, frame: FrameType | None) -> None:
        sys.exit(2)

    signal.signal(signal.SIGTERM, refused)
    return RANK_0_REFUSAL_WAIT_S


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`SIGTERMException` wherever the Trainer's own handler is not installed.

    The Trainer handles SIGTERM only while its loops run (it stops them at the next batch). Pruning before ``fit``
    (``on_fit_start``), the save at the end of ``fit``, loading the model and everything else would die at once with
    the default handler: no message, and the write under way left behind. Raised instead, the exception unwinds
    through the engine's transaction (the weights are restored) and the atomic folder write (its partial folder is
    removed), and :func:`main` ends the run with status 143. Inside the loops the Trainer calls this handler after its
    own: it does nothing there, so the Trainer still stops at a batch boundary.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signal.SIGTERM) is stop:  # the Trainer's handler is not in place
            raise SIGTERMException(SIGTERM_STATUS)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_summary(error: BaseException) -> str:
    """``error (kind): <message>`` in a few lines: jsonargparse's listing of the types it tried is left out, and so is
    the traceback that torch wraps an error raised in a DataLoader worker in (:func:`_worker_error_message`)."""
    message = _worker_error_message(error)
    lines = [line.strip() for line in (message.strip() or type(error).__name__).splitlines() if line.strip()]
    kept = [line.removeprefix("- ") for line in lines if not line.startswith(_PARSER_NOISE)] or lines[:1]
    configuration = (ArgumentError, ConfigurationError, MisconfigurationException)
    kind = "configuration error" if isinstance(error, configuration) else type(error).__name__
    return f"error ({kind}): {chr(10).join(dict.fromkeys(kept[:8]))}\n(ECOFLAP_DEBUG=1 shows the traceback)"


_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call ")


def _worker_error_message(error: BaseException) -> str:
    """The message of ``error``; for an error raised in a DataLoader worker (``num_workers > 0``), the message of the
    error the worker raised.

    torch raises it again in the main process as an error of the same type whose message is ``Caught <type> in
    DataLoader worker process N.`` and the worker's whole traceback, causes first: the first lines of the summary were
    the cause's (PIL's ``cannot identify image file``), and the message naming the sample and the ``HINT`` was cut.
    """
    text = str(error)
    if _WORKER_TRACEBACK.match(text) is None:
        return text
    lines = text.splitlines()
    own = re.compile(rf"(?:[\w.]+\.)?{re.escape(type(error).__name__)}(?::|$)")
    last = next((i for i in range(len(lines) - 1, 0, -1) if own.match(lines[i])), None)
    if last is None:
        return text
    return "\n".join([lines[last].partition(": ")[2], *lines[last + 1 :]])


class _PrintVersions(argparse.Action):
    """``ecoflap --version``: this package's version and those of the libraries a bug report needs, one per line
    (argparse's own ``version`` action refills the text to the terminal's width)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(installed_versions())
        parser.exit()


def _global_rank() -> int:
    """This process's global rank as Lightning's ``rank_zero_only`` holds it: read from the launcher's environment
    (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) before the Trainer exists, the Trainer's global rank once it does."""
    rank: int = rank_zero_only.rank  # type: ignore[attr-defined]  # set on the function object by Lightning
    return rank


def refusal_on_this_rank(error: BaseException) -> str:
    """What this process prints of an error that ends the run: :func:`error_summary` on global rank 0, one short line
    on any other rank.

    Under ``torchrun`` or ``srun`` every rank runs the whole command, so each would print the same refusal of the same
    config; under Lightning's own DDP launch, the processes it starts would too (the rank: :func:`_global_rank`). The
    other ranks keep one line, so that an error met on one node only (a file missing there) is not hidden.
    """
    summary = error_summary(error)
    rank = _global_rank()
    if rank == 0:
        return summary
    first = textwrap.shorten(summary.splitlines()[0], width=80, placeholder=" ...")
    return rank_prefixed_message(f"{first} (rank 0 prints the whole message)", rank)


_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def check_config_files(args: list[str]) -> None:
    """Parse every ``-c``/``--config`` YAML file first, so that a syntax error names the file, line and column.

    Raises:
        ConfigurationError: a file that is not valid YAML.
    """
    paths = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for path in paths:
        if not Path(path).is_file():
            continue  # the parser reports missing files itself
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigurationError(
                f"The config file {path}{where} is not valid YAML: {problem}. HINT: check the brackets, quotes and "
                "indentation around that line."
            ) from error


if __name__ == "__main__":
    main()
