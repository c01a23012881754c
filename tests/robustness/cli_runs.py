"""Running ``ecoflap`` for the robustness cases: in this process through ``ecoflap_pl.cli.main`` (the console entry
point) with everything a user would see collected, or as a subprocess when a signal must reach it."""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ecoflap_pl.cli import main

TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def interruptible() -> None:
    """``preexec_fn`` of the subprocesses a test signals: the default SIGINT disposition, as in a terminal. A shell
    without job control starts a background job (``pytest ... &`` in a script) with SIGINT ignored, its children
    inherit that, and Python then installs no KeyboardInterrupt handler: Ctrl+C would never reach the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Outcome:
    """Exit status and every line shown: stdout, stderr, log records and warnings."""

    code: int
    text: str

    def metric(self, name: str) -> float:
        """The value of ``name`` in Lightning's results table."""
        match = re.search(rf"{re.escape(name)}\s*[│|]\s*([-0-9.e+]+)", self.text)
        assert match, f"{name} not in the output:\n{self.text[-2000:]}"
        return float(match.group(1))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_ecoflap(capsys: Any, *args: str) -> Outcome:
    """``ecoflap ARGS`` in this process; SystemExit becomes the exit status."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("", "lightning.pytorch")]
    for logger in loggers:
        logger.addHandler(handler)
    levels = [logger.level for logger in loggers]
    loggers[0].setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            argv, sys.argv = sys.argv, ["ecoflap", *args]  # as the console script is started
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            finally:
                sys.argv = argv
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    captured = capsys.readouterr()
    shown = [captured.out, captured.err, *handler.lines, *(str(w.message) for w in caught)]
    return Outcome(code, "\n".join(shown))


def vit_config(tmp_path: Path, demo_data: Any, model: dict[str, Any] | None = None, **pruning: Any) -> str:
    """A tiny timm ViT on the demo ImageNet layout (its validation logs a loss, so dense and pruned differ);
    ``model`` overrides entries of its timm ``model_config``."""
    config = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "ecoflap_pl.tasks.ClassificationTask",
            "init_args": {
                "timm_model": "vit_tiny_patch16_224",
                "pretrained": False,
                "model_config": {**TINY_VIT, **(model or {})},
            },
        },
        "data": {
            "class_path": "ecoflap_pl.datamodules.ImageNetDataModule",
            "init_args": {"data_dir": str(demo_data.imagenet), "batch_size": 5, "calibration_batch_size": 4},
        },
        "pruning": {"sparsity": 0.5, "coarse_samples": 4, "fine_samples": 8, "progress": False, **pruning},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def vqa_config(
    tmp_path: Path, demo_data: Any, blip2_dir: Path, data: dict[str, Any] | None = None, **pruning: Any
) -> str:
    """The tiny BLIP-2 VQA task on the demo VQAv2 layout."""
    config = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "ecoflap_pl.tasks.VQATask",
            "init_args": {"pretrained": str(blip2_dir), "num_beams": 1, "max_new_tokens": 2},
        },
        "data": {
            "class_path": "ecoflap_pl.datamodules.VQAv2DataModule",
            "init_args": {
                "data_dir": str(demo_data.coco),
                "batch_size": 2,
                "calibration_batch_size": 2,
                **(data or {}),
            },
        },
        "pruning": {"sparsity": 0.5, "coarse_samples": 2, "fine_samples": 4, "progress": False, **pruning},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``: equal digests mean untouched files."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
