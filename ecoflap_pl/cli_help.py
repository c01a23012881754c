"""What ``ecoflap --help`` and each subcommand's ``--help`` say, where LightningCLI would print Lightning's words.

LightningCLI describes the command ("Lightning Trainer command line tool"), its subcommands and the options of each
(``--ckpt_path``, ...) with the docstrings of the ``Trainer`` methods, written for ``trainer.fit(model)`` in a script:
"Runs the full optimization routine", a ``ckpt_path`` of "the previous ``trainer.fit`` call". Here every run builds
its model from the config, prunes it, and reads a checkpoint that may hold a pruned model, so these texts say that.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

DESCRIPTION = (
    "Prune a model with ECoFLaP, then evaluate or fine-tune it (LightningCLI). `validate` and `test` prune, then "
    "evaluate (--compare_dense true: dense and pruned side by side); `fit` prunes, then fine-tunes with the masks "
    "held fixed; `prune` prunes and saves (--pruning.save_to DIR); `predict` prunes only when pruning.stages names "
    "it. The pruning settings are the `pruning:` section (`ecoflap validate --help` lists them). Configs: "
    "configs/README.md."
)
"""What ``ecoflap --help`` says the command does (LightningCLI's default is "Lightning Trainer command line tool")."""

SUBCOMMAND_HELP = {
    "fit": "Prune, then fine-tune with the masks held fixed.",
    "validate": "Prune, then evaluate on the validation split (--compare_dense true: dense and pruned side by side).",
    "test": "Prune, then evaluate on the test split (--compare_dense true: dense and pruned side by side).",
    "predict": "Run the task's predictions on the test split (no metrics); prunes only if pruning.stages names it.",
    "prune": "Prune and save the model (--pruning.save_to DIR), without training or evaluating.",
}
"""What ``ecoflap --help`` lists for each subcommand, and each one's ``--help`` begins with (Lightning's would be the
first line of the Trainer method's docstring: "Runs the full optimization routine.")."""

_CHECKPOINT = (
    "a .ckpt file a run of this task saved (under its trainer.default_root_dir: lightning_logs/version_N/checkpoints/ "
    "with the default logger, checkpoints/ without one), or one of "
    "Lightning's names ('last', 'hpc', 'registry[:NAME[:version:V]]'). A local file is checked before the model is "
    "built: it must exist and hold the bytes the Trainer wrote; a checkpoint of another task is refused, and the "
    "checkpoint's hyperparameters replace the config's model arguments (a warning names them)."
)

CKPT_PATH_HELP = {
    "fit": "The checkpoint to resume fine-tuning from (weights, optimizer state, step): "
    + _CHECKPOINT
    + " One saved after pruning keeps its masks and is not pruned again; a dense one is pruned first when "
    "pruning.stages names fit.",
    "validate": "The checkpoint to evaluate instead of the model the config builds: "
    + _CHECKPOINT
    + " One saved after pruning is evaluated as it is (its masks restored, not pruned again); a dense one is pruned "
    "first when pruning.stages names validate. With --compare_dense: see there.",
    "test": "The checkpoint to evaluate instead of the model the config builds: "
    + _CHECKPOINT
    + " One saved after pruning is evaluated as it is (its masks restored, not pruned again); a dense one is pruned "
    "first when pruning.stages names test. With --compare_dense: see there.",
    "predict": "The checkpoint to predict with instead of the model the config builds: "
    + _CHECKPOINT
    + " One saved after pruning is used as it is (its masks restored); a dense one is pruned first only when "
    "pruning.stages names predict.",
    "prune": "The checkpoint to start from: "
    + _CHECKPOINT
    + " One saved after pruning is not pruned again (its masks are restored); a dense one is pruned. Restored as fit "
    "restores it (weights, masks, step) but for the optimizer state, which prune never uses: one saved with "
    "save_weights_only is pruned or saved as it is too.",
}
"""``--ckpt_path`` of each subcommand (Lightning's speaks of "the previous ``trainer.fit`` call" of a script)."""

_VERBOSE_HELP = (
    "Print the table of metrics at the end (with --compare_dense, the table of dense and pruned metrics is printed "
    "instead, whatever this says)."
)

_RETURN_PREDICTIONS_HELP = (
    "Keep every batch's predictions in memory until the run ends, as `trainer.predict` returns them: the command "
    "neither prints nor saves them (a lightning.pytorch.callbacks.BasePredictionWriter under trainer.callbacks writes "
    "them). Unset: kept, except under a strategy that starts processes."
)

_GROUP_TITLES = {
    "trainer": "Lightning's Trainer: the `trainer:` section",
    "optimizer": "The optimizer of `fit`, instead of the task's own (AdamW with warm-up and cosine decay)",
    "lr_scheduler": "The learning-rate schedule of `fit` with --optimizer (ignored without it; unset with it: a "
    "constant rate)",
}
"""Titles of the argument groups LightningCLI adds: its own are the first docstring line of the trainer class (with its
markup), torch's docstring ("Base class for all optimizers") and the tuple of scheduler classes."""


def describe_subcommand(parser: ArgumentParser, subcommand: str) -> None:
    """Replace Lightning's words in the ``--help`` of one subcommand's parser: the title of the group of the Trainer
    method's own arguments (its docstring's first paragraph), ``--ckpt_path``, ``--verbose``, ``--return_predictions``,
    and the titles of the trainer, optimizer and learning-rate schedule groups.

    Args:
        parser: the subcommand's parser, its arguments added (jsonargparse names the method's group after it).
        subcommand: ``fit``, ``validate``, ``test``, ``predict`` or ``prune``.
    """
    groups = parser.groups or {}
    for name, title in {subcommand: f"Options of `ecoflap {subcommand}`", **_GROUP_TITLES}.items():
        if name in groups:
            groups[name].title, groups[name].description = title, None
    helps = {
        "ckpt_path": CKPT_PATH_HELP[subcommand],
        "verbose": _VERBOSE_HELP,
        "return_predictions": _RETURN_PREDICTIONS_HELP,
    }
    for action in groups[subcommand]._group_actions:
        action.help = helps.get(action.dest, action.help)
