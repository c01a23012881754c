"""Fine-tuning after pruning under a sharded strategy (FSDP) is not possible on these machines: Lightning runs FSDP
on GPUs only, and the pruning callback refuses strategies that restore checkpoints after sharding. The README says
what to use instead (prune, then fine-tune under DDP with the masks fixed)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.models.tiny import tiny_processor
from ecoflap_pl.tasks import VQATask


def test_lightning_runs_fsdp_on_gpus_only(trainer_factory):
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        trainer_factory(strategy=FSDPStrategy(), callbacks=[ECoFLaPPruning(sparsity=0.5, stages=["fit"])])


class _RestoresAfterSetup(SingleDeviceStrategy):
    """A single-device strategy that, like FSDP and DeepSpeed, loads checkpoints only after wrapping the model."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_the_callback_refuses_strategies_that_restore_after_sharding(tmp_path, trainer_factory):
    config, processor = tiny_processor("llava", ["what color is the bus?", "red blue yes no"] * 3)
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    task = VQATask(model_config=config.to_dict(), tokenizer=str(tmp_path / "tokenizer"))
    trainer = trainer_factory(strategy=_RestoresAfterSetup("cpu"))
    with pytest.raises(ValueError, match=r"HINT: prune with a DDP or single-device Trainer and save \(`ecoflap prune"):
        ECoFLaPPruning(sparsity=0.5, stages=["fit"]).setup(trainer, task, "fit")
