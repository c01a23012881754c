"""``ecoflap``: the LightningCLI entry point of every job (prune, evaluate, fine-tune, predict).

``ecoflap validate -c configs/experiments/x.yaml`` prunes then evaluates, ``ecoflap fit`` prunes then fine-tunes
with the masks held fixed, ``ecoflap prune`` prunes and saves without evaluating or training. The pruning settings
are the ``pruning:`` section (the arguments of :class:`~ecoflap_pl.callbacks.ECoFLaPPruning`); the task's collator
(its processor and tokenizer) is linked into the DataModule, so datasets never load a model's processing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.console import quiet_lightning
from ecoflap_pl.datamodules import EcoflapDataModule
from ecoflap_pl.tasks.base import EcoflapTask

log = logging.getLogger(__name__)


class EcoflapTrainer(pl.Trainer):
    """The Lightning ``Trainer`` plus :meth:`prune`, the ``ecoflap prune`` subcommand."""

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
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, ckpt_path: str | None = None
    ) -> None:
        """Prune the model and save it (``pruning.save_to``) without training or evaluating.

        Runs the ``fit`` lifecycle with zero optimizer steps, so pruning happens exactly as before fine-tuning:
        on the configured devices, under the configured strategy (DDP ranks share the calibration batches), with
        the report and the saved model written once pruning ends.

        Args:
            model: the task whose ``model`` is pruned.
            datamodule: the data, whose ``calibration_dataloader`` feeds pruning.
            ckpt_path: a checkpoint to start from (one that is already pruned is not pruned again).
        """
        callback = self.pruning_callback()
        if "fit" not in callback.stages:
            raise ValueError(
                "`ecoflap prune` prunes at the start of the fit stage, but `pruning.stages` is "
                f"{list(callback.stages)}. HINT: add 'fit' to pruning.stages."
            )
        if callback.save_to is None:
            log.warning("`pruning.save_to` is not set: the pruned model is only reported, not saved.")
        self.fit_loop.epoch_loop.max_steps = 0
        self.num_sanity_val_steps = 0
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)


def _collator(task: EcoflapTask) -> Callable[[list[dict[str, Any]]], Any]:
    return task.collator


class EcoflapCLI(LightningCLI):
    """LightningCLI with the pruning callback as a ``pruning:`` section, a ``prune`` subcommand and
    ``--compare_dense`` (evaluate the dense model first and print dense and pruned metrics side by side)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "prune": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ECoFLaPPruning, "pruning")
        parser.link_arguments("model", "data.init_args.collate_fn", compute_fn=_collator, apply_on="instantiate")
        parser.add_argument(
            "--compare_dense",
            type=bool,
            default=False,
            help="validate/test: evaluate the dense model first, then prune and evaluate again, and print both.",
        )

    def validate(self, **kwargs: Any) -> None:
        self._evaluate(self.trainer.validate, **kwargs)

    def test(self, **kwargs: Any) -> None:
        self._evaluate(self.trainer.test, **kwargs)

    def _evaluate(self, run: Callable[..., list[Mapping[str, float]]], **kwargs: Any) -> None:
        if not self._get(self.config, "compare_dense"):
            run(**kwargs)
            return
        callback = self.trainer.pruning_callback()
        if callback.pruned:
            raise ValueError("`compare_dense` needs a dense model, but the model given is already pruned.")
        kwargs = {**kwargs, "verbose": False}  # one table of both runs below, not one per run
        self.trainer.callbacks.remove(callback)
        try:
            dense = run(**kwargs)
        finally:
            self.trainer.callbacks.append(callback)
        pruned = run(**{**kwargs, "ckpt_path": None})
        if self.trainer.is_global_zero:
            sparsity = callback.result.overall_sparsity if callback.result is not None else 0.0
            Console().print(comparison_table(dense[0] if dense else {}, pruned[0] if pruned else {}, sparsity))


def comparison_table(dense: Mapping[str, float], pruned: Mapping[str, float], sparsity: float) -> Table:
    """Dense and pruned metrics side by side, with the difference."""
    table = Table(title=f"Dense vs pruned ({100 * sparsity:.1f}% of the candidate weights pruned)")
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("Δ", justify="right")
    for key in sorted(set(dense) | set(pruned)):
        before, after = dense.get(key), pruned.get(key)
        delta = f"{after - before:+.4f}" if before is not None and after is not None else ""
        table.add_row(key, _fmt(before), _fmt(after), delta)
    return table


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


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``ecoflap {fit,validate,test,predict,prune} -c CONFIG.yaml``."""
    quiet_lightning()
    build_cli(args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
