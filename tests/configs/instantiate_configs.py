"""Instantiate ``ecoflap`` configs in one process: ``python instantiate_configs.py JOBS.json RESULTS.json``.

``JOBS.json`` maps a job name to the ``ecoflap`` arguments of one run (``-c`` files, then overrides). Each job is
parsed by the ``ecoflap`` CLI parser and instantiated (task, DataModule with the linked collator, Trainer with the
pruning callback) without running anything. ``RESULTS.json`` maps each job name to what was built, or to the error.
One process serves every job: importing torch, transformers and Lightning once keeps the whole check fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from ecoflap_pl.cli import build_cli

TASK_ATTRIBUTES = ("learning_rate", "weight_decay", "prompt", "generation_kwargs", "itm_top_k", "family")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def instantiate(args: list[str]) -> dict[str, Any]:
    """Build the run ``ecoflap <args>`` describes and summarise it."""
    cli = build_cli(
        args,
        save_config_callback=None,
        parser_kwargs={"exit_on_error": False},  # raise the parse error instead of printing it and exiting
        run=False,
    )
    trainer, task, data = cli.trainer, cli.model, cli.datamodule
    callback = trainer.pruning_callback()
    return {
        "task": type(task).__name__,
        "model": type(task.model).__name__,
        "data": type(data).__name__,
        "collator_linked": data.collate_fn is task.collator,
        "task_attributes": {name: _jsonable(getattr(task, name)) for name in TASK_ATTRIBUTES if hasattr(task, name)},
        "data_hparams": _jsonable(dict(data.hparams)),
        "pruning": callback.config.to_dict(),
        "stages": list(callback.stages),
        "save_to": callback.save_to,
        "trainer": {
            "max_epochs": trainer.max_epochs,
            "precision": trainer.precision,
            "strategy": type(trainer.strategy).__name__,
            "default_root_dir": trainer.default_root_dir,
            "callbacks": sorted(type(c).__name__ for c in trainer.callbacks),
        },
    }


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path, encoding="utf-8") as handle:
        jobs: dict[str, list[str]] = json.load(handle)
    results: dict[str, Any] = {}
    for name, args in jobs.items():
        try:
            results[name] = {"ok": True, **instantiate(args)}
        except Exception as error:  # noqa: BLE001 - every failure is reported for its job
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
