"""Models dispatched with Accelerate's big-model placement (CPU and disk offload) are pruned where they live."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from ecoflap_pl import PruningConfig, prune, score_groups
from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.cli import EcoflapTrainer
from ecoflap_pl.export import least_export_bytes, load_pruned_model, tensor_bytes, write_pruned_model
from ecoflap_pl.models import loading
from ecoflap_pl.models.loading import build_hf_model
from ecoflap_pl.models.placement import OffloadedWeights, placement
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.tasks.base import EcoflapTask
from tests.trainers import quiet_trainer

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
CONFIG = PruningConfig(sparsity=0.5, importance="zeroth_order", coarse_samples=4, fine_samples=4)


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(8, 128, (2, 12), generator=generator)} for _ in range(2)]


@pytest.fixture
def saved(tmp_path):
    """(in-memory tiny LLaMA, its save_pretrained folder, the same model loaded with two layers on disk)."""
    model = tiny_model("llama", layers=3)
    model.save_pretrained(tmp_path / "model")
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    ).eval()
    return model, tmp_path, offloaded


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("activation_storage", "probe_granularity", "score"),
    [
        ("recompute", "per_tensor", "grad_only"),
        ("auto", "per_tensor", "grad_only"),
        ("auto", "per_block", "grad_mag_abs"),
        ("auto", "per_tensor", "grad_mag_square"),
    ],
)
def test_disk_offloaded_model_gets_the_masks_and_weights_of_the_model_in_memory(
    saved, activation_storage, probe_granularity, score
):
    """Both zeroth-order paths (the plain per-probe loop, and recorded outputs with batched probes), per tensor and
    per block, with every score variant: the same scores, allocation and masks as the model in memory."""
    model, folder, offloaded = saved
    config = replace(CONFIG, activation_storage=activation_storage, probe_granularity=probe_granularity, score=score)
    checkpoint = _digest(folder / "model")
    assert placement(offloaded)["model.layers.1"] == "disk" and placement(model) is None
    in_memory = prune(model, _batches(), _loss, config)
    with OffloadedWeights(offloaded) as weights:
        assert weights.offloaded("model.layers.1.mlp.up_proj.weight") and not weights.offloaded("model.layers.0")
        result = prune(offloaded, _batches(), _loss, config, residency=weights)
    assert result.group_scores == in_memory.group_scores
    assert result.group_sparsity == in_memory.group_sparsity and result.masks.keys() == in_memory.masks.keys()
    for name, mask in in_memory.masks.items():
        assert torch.equal(result.masks[name], mask), name
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # still offloaded
    ids = _batches()[0]["input_ids"]
    assert torch.equal(offloaded(ids).logits, model(ids).logits)  # the pruned weights were stored back
    assert _digest(folder / "model") == checkpoint  # copy-on-write: the checkpoint is untouched
    assert not list((folder / "offload").glob("*.orig"))


def test_failed_pruning_restores_the_offloaded_weights(saved):
    _, folder, offloaded = saved
    ids = _batches()[0]["input_ids"]
    dense = offloaded(ids).logits
    calls = 0

    def interrupt(module, args):
        nonlocal calls
        calls += 1
        if calls == 3:  # discovery, capture, then the fine step's replay: layers 0 and 1 are pruned and stored
            raise KeyboardInterrupt

    handle = offloaded.model.layers[2].register_forward_pre_hook(interrupt)
    config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=2)
    with pytest.raises(KeyboardInterrupt), OffloadedWeights(offloaded) as weights:
        prune(offloaded, _batches(), _loss, config, residency=weights)
    handle.remove()
    assert calls == 3 and list((folder / "offload").glob("*.dat")) == []  # layer 1 had been written, then undone
    assert torch.equal(offloaded(ids).logits, dense)


@pytest.mark.parametrize("importance", ["first_order", "gradient_norm"])
def test_scores_needing_every_weight_at_once_are_refused(saved, importance):
    _, _, offloaded = saved
    with OffloadedWeights(offloaded) as weights, pytest.raises(ValueError, match="HINT: use importance='zeroth_order'"):
        prune(offloaded, _batches(), _loss, PruningConfig(sparsity=0.5, importance=importance), residency=weights)


@pytest.mark.parametrize("importance", ["uniform", "zeroth_order"])
def test_peak_resident_memory_while_pruning_stays_below_the_model_size(tmp_path, importance):
    """Measured in fresh processes; glibc's fixed mmap threshold returns each freed block buffer to the system (its
    default, dynamic threshold keeps them in the heap, where they count as resident). ``zeroth_order`` runs the
    coarse step's fast path (recorded block outputs, batched probes) on the offloaded blocks too."""
    script = str(Path(__file__).resolve().parents[2] / "benchmarks" / "offload_memory.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, "build", str(tmp_path / "model")], check=True, env=env)
    (tmp_path / "offload").mkdir()
    run = subprocess.run(
        [
            sys.executable,
            script,
            "prune",
            str(tmp_path / "model"),
            str(tmp_path / "offload"),
            "--importance",
            importance,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert figures["peak_increase"] < figures["model_bytes"], figures
    if importance == "zeroth_order":
        assert figures["probe_replicas"] == 4, figures  # the fast path ran, probes batched


def test_prior_zeros_of_offloaded_weights_count_as_in_memory(tmp_path):
    """A model pruned before: its zeros are counted and kept pruned whether the weights are offloaded or not."""
    model = tiny_model("llama", layers=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, share in ((0, 0.3), (1, 0.7)):  # layer 0 in CPU memory, layer 1 on disk; 0.7 is above the target
            weight = model.model.layers[layer].mlp.up_proj.weight
            weight.masked_fill_(torch.rand(weight.shape, generator=generator) < share, 0.0)
    model.save_pretrained(tmp_path / "model")
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    ).eval()
    in_memory = prune(model, _batches(), _loss, CONFIG)
    with OffloadedWeights(offloaded) as weights:
        result = prune(offloaded, _batches(), _loss, CONFIG, residency=weights)
    assert in_memory.prior_sparsity > 0.01
    assert result.prior_sparsity == in_memory.prior_sparsity
    assert result.achieved_sparsity == in_memory.achieved_sparsity
    assert in_memory.achieved_sparsity["model.layers.1.mlp.up_proj.weight"] > 0.65  # the earlier zeros stay pruned
    for name, mask in in_memory.masks.items():
        assert torch.equal(result.masks[name], mask), name


@pytest.mark.parametrize("probe_granularity", ["per_tensor", "per_block"])
def test_offloaded_model_takes_the_fast_zeroth_order_path(saved, caplog, probe_granularity):
    """Prefix reuse and batched probes on a model with CPU- and disk-offloaded blocks: the scores of the model in
    memory (same path) and of the plain per-probe loop, within fp32 rounding, with no fallback."""
    model, _, offloaded = saved
    config = replace(CONFIG, probe_granularity=probe_granularity, max_probe_replicas=4)
    in_memory = score_groups(model, _batches(), _loss, config)
    plain = score_groups(model, _batches(), _loss, replace(config, activation_storage="recompute"))
    with caplog.at_level(logging.WARNING), OffloadedWeights(offloaded) as weights:
        fast = score_groups(offloaded, _batches(), _loss, config, residency=weights)
    assert "fall back" not in caplog.text and "do not apply" not in caplog.text, caplog.text
    assert fast.scores == pytest.approx(in_memory.scores, rel=1e-5)
    assert fast.scores == pytest.approx(plain.scores, rel=1e-3)
    assert fast.stats.probe_replicas == 4  # the probes shared forwards
    layers = len(offloaded.model.layers)
    assert fast.stats.block_forwards < layers * plain.stats.full_forwards  # the blocks before a probed one did not run
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # offloaded again, unchanged
    ids = _batches()[0]["input_ids"]
    assert torch.equal(offloaded(ids).logits, model(ids).logits)


def test_backward_leaves_offloaded_weights_without_gradients(saved):
    """Why an offloaded model cannot be fine-tuned: Accelerate loads a copy of an offloaded module's weights for each
    forward; the gradients land on the copy, the module's own (meta) parameters get none, and AdamW skips them
    without an error, so the stored weights never change while the resident ones do."""
    _, _, offloaded = saved
    layer = offloaded.model.layers[1]

    def stored() -> torch.Tensor:
        with OffloadedWeights(offloaded).resident(["model.layers.1"], write_back=False):
            return torch.cat([p.detach().flatten().clone() for p in layer.parameters()])

    before = stored()
    resident = offloaded.model.layers[0].mlp.up_proj.weight
    kept = resident.detach().clone()
    offloaded.train()
    optimizer = torch.optim.AdamW(offloaded.parameters(), lr=1e-2)
    ids = _batches()[0]["input_ids"]
    offloaded(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert offloaded.model.layers[1].mlp.up_proj.weight.grad is None and resident.grad is not None
    assert torch.equal(stored(), before)
    assert not torch.equal(resident.detach(), kept)


class _LMTask(EcoflapTask):
    def __init__(self, model):
        super().__init__(learning_rate=1e-3)
        self.model = model

    def calibration_loss(self, batch):
        return _loss(self.model, batch)


class _LMData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_batches(), batch_size=None)

    def calibration_dataloader(self, num_samples=None):
        return self.train_dataloader()


def test_fit_of_an_offloaded_model_is_refused_before_pruning(saved, tmp_path):
    _, folder, offloaded = saved
    ids = _batches()[0]["input_ids"]
    dense = offloaded(ids).logits
    callback = ECoFLaPPruning(sparsity=0.5, importance="uniform", fine_samples=4, stages=["fit"], progress=False)
    with pytest.raises(ValueError, match=r"model.layers.1.* HINT: prune and save with `ecoflap prune`"):
        quiet_trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path).fit(
            _LMTask(offloaded), datamodule=_LMData()
        )
    assert not callback.pruned and list((folder / "offload").glob("*.dat")) == []
    assert torch.equal(offloaded(ids).logits, dense)


def test_ecoflap_prune_of_an_offloaded_model_reports_its_placement(saved, tmp_path):
    """The fit lifecycle without optimizer steps (``ecoflap prune``) prunes where the weights live, with the masks of
    the model in memory, and the report records the placement."""
    model, _, offloaded = saved
    config = {"sparsity": 0.5, "importance": "zeroth_order", "coarse_samples": 4, "fine_samples": 4}
    in_memory = prune(model, _batches(), _loss, PruningConfig(**config))
    callback = ECoFLaPPruning(**config, stages=["fit"], progress=False)
    trainer = EcoflapTrainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path
    )
    trainer.prune(_LMTask(offloaded), datamodule=_LMData())
    assert callback.result.group_sparsity == in_memory.group_sparsity
    assert all(torch.equal(callback.masks[name], mask) for name, mask in in_memory.masks.items())
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["metadata"]["placement"] == DEVICE_MAP


def test_max_memory_is_read_in_the_forms_a_config_gives_it(saved):
    """A JSON config's GPU keys are strings ("0": Accelerate said "Device 0 is not recognized, available devices are
    integers"), and "10e9" from the command line is a string Accelerate cannot read."""
    _, folder, _ = saved
    kwargs = loading.placement_kwargs("auto", {"cpu": "4e4"}, str(folder / "offload"))
    assert kwargs["max_memory"] == {"cpu": 40_000}
    assert "disk" in placement(build_hf_model(LlamaForCausalLM, str(folder / "model"), **kwargs)).values()
    assert loading.placement_kwargs("auto", {"0": "1GiB", "cpu": 5e9}, None)["max_memory"] == {
        0: 2**30,
        "cpu": 5 * 10**9,
    }


@pytest.mark.parametrize(
    ("max_memory", "expected"),
    [
        ({"gpu": "10GiB"}, r"`max_memory` names the device 'gpu', which is no device\. HINT: map GPU numbers"),
        ({"cpu": "ten"}, r"`max_memory` gives 'cpu' the size 'ten', which is not one\. HINT"),
        ({"cpu": -1}, r"gives 'cpu' the size -1, which is not one"),
    ],
)
def test_max_memory_that_accelerate_cannot_use_is_refused_by_entry(max_memory, expected):
    with pytest.raises(ValueError, match=expected):
        loading.placement_kwargs("auto", max_memory, None)


def test_disk_offload_without_an_offload_folder_is_refused_before_pruning(saved, tmp_path):
    """The weights on disk are then read from the model's own files, which pruning never writes: refused only when the
    first pruned block was stored back, after the whole coarse pass."""
    model, folder, _ = saved
    offloaded = LlamaForCausalLM.from_pretrained(folder / "model", device_map=DEVICE_MAP).eval()
    ids = _batches()[0]["input_ids"]
    dense = offloaded(ids).logits
    callback = ECoFLaPPruning(sparsity=0.5, importance="zeroth_order", coarse_samples=4, stages=["fit"], progress=False)
    trainer = EcoflapTrainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path
    )
    forwards = []
    handle = offloaded.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(
        ValueError,
        match=r"The weights of 'model.layers.1.self_attn.q_proj'.* no offload folder.* HINT: add --model.init_args",
    ):
        trainer.prune(_LMTask(offloaded), datamodule=_LMData())
    handle.remove()
    assert not forwards and not callback.pruned  # refused before the coarse pass
    assert torch.equal(offloaded(ids).logits, dense)


def test_save_to_holding_the_offload_folder_is_refused_before_pruning(tmp_path):
    """`save_to` replaced the offload folder inside it, pruned weights included: the model then failed to read them
    ("No such file or directory: '…/offload/model.layers.1….dat'") in the evaluation that followed."""
    tiny_model("llama", layers=3).save_pretrained(tmp_path / "model")
    offload = tmp_path / "pruned" / "offload"
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map=DEVICE_MAP, offload_folder=str(offload)
    ).eval()
    callback = ECoFLaPPruning(
        sparsity=0.5,
        importance="uniform",
        stages=["fit"],
        progress=False,
        save_to=str(tmp_path / "pruned"),
        overwrite=True,
    )
    trainer = EcoflapTrainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=rf"`save_to` is .*pruned', which holds the source model \({offload}\)"):
        trainer.prune(_LMTask(offloaded), datamodule=_LMData())
    assert not callback.pruned
    offloaded(_batches()[0]["input_ids"])  # its offloaded weights are where it reads them


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_ecoflap_prune_of_an_offloaded_model_saves_its_pruned_weights(saved, tmp_path, save_format):
    """README's "larger than one device" recipe: prune where the weights live, then `save_to`. The saved folder holds
    the pruned values of the disk-offloaded weights too (they were `meta` in the model, which broke the finiteness
    check and the sparse encoder), equal to the model pruned in memory."""
    model, _, offloaded = saved
    config = {"sparsity": 0.5, "importance": "zeroth_order", "coarse_samples": 4, "fine_samples": 4}
    prune(model, _batches(), _loss, PruningConfig(**config))
    callback = ECoFLaPPruning(
        **config, stages=["fit"], progress=False, save_to=str(tmp_path / "pruned"), save_format=save_format
    )
    trainer = EcoflapTrainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path
    )
    trainer.prune(_LMTask(offloaded), datamodule=_LMData())
    loaded = load_pruned_model(tmp_path / "pruned")
    expected = model.state_dict()
    assert (expected["model.layers.2.mlp.up_proj.weight"] == 0).any()  # an offloaded weight, pruned
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.gpu
def test_gpu_model_with_cpu_and_disk_offload_gets_the_scores_and_masks_on_the_gpu(tmp_path):
    """On a GPU: blocks executed on ``cuda:0`` with their weights in CPU memory or on disk (the fast zeroth-order path
    and the fine step load one block at a time onto the GPU) give the scores and masks of the model held on the GPU."""
    model = tiny_model("llama", layers=3)
    model.save_pretrained(tmp_path / "model")
    device_map = {**DEVICE_MAP, "model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    device_map["model.layers.0"] = "cpu"  # with a GPU, "cpu" offloads: the layer runs on cuda:0
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    model = model.to("cuda")
    batches = [{"input_ids": batch["input_ids"].to("cuda")} for batch in _batches()]
    in_memory = prune(model, batches, _loss, CONFIG)
    with OffloadedWeights(offloaded) as weights:
        assert weights.offloaded("model.layers.0.mlp.up_proj.weight")
        result = prune(offloaded, batches, _loss, CONFIG, residency=weights)
    assert result.group_scores == pytest.approx(in_memory.group_scores, rel=1e-4)
    assert result.stages["coarse"].probe_replicas >= 1  # the fast path, no fallback
    for name, mask in in_memory.masks.items():
        assert torch.equal(result.masks[name].cpu(), mask.cpu()), name


@pytest.mark.parametrize(
    ("placement_kwargs", "named"),
    [
        ({"device_map": {"": "cuda:0"}}, "('': 'cuda:0')"),
        ({"device_map": "cuda"}, "('cuda')"),
        ({"device_map": {"model.layers.0": 0, "lm_head": "cpu"}}, "('model.layers.0': 0)"),
        ({"device_map": "auto", "max_memory": {0: "1GiB", "cpu": "1GiB"}}, "(max_memory key 0)"),
    ],
)
def test_a_device_map_on_a_gpu_is_refused_before_loading_where_torch_sees_none(
    tmp_path, monkeypatch, placement_kwargs, named
):
    """transformers failed inside torch ("Found no NVIDIA driver on your system", a RuntimeError with a traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, where a GPU might be there
    tiny_model("llama", layers=2).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="puts weights on a CUDA GPU") as refusal:
        build_hf_model(LlamaForCausalLM, str(tmp_path / "model"), **placement_kwargs)
    message = str(refusal.value)
    assert named in message and "torch sees none here" in message
    assert "HINT: on the CPU, use device_map: cpu, or device_map: auto with max_memory for 'cpu' and 'disk'" in message


@pytest.mark.parametrize(
    "placement_kwargs",
    [{"device_map": "auto"}, {"device_map": "cpu"}, {"device_map": "auto", "max_memory": {"cpu": "1GiB"}}],
)
def test_a_device_map_for_the_cpu_loads_where_torch_sees_no_gpu(tmp_path, monkeypatch, placement_kwargs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_model("llama", layers=2).save_pretrained(tmp_path / "model")
    model = build_hf_model(LlamaForCausalLM, str(tmp_path / "model"), **placement_kwargs)
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("save_format", ["dense", "sparse-bitmask"])
def test_the_dense_size_of_an_offloaded_model_counts_a_tied_weight_once(tmp_path, save_format):
    model = tiny_model("llama", layers=3)
    model.config.tie_word_embeddings = True  # lm_head shares the input embedding, as OPT's does
    model.tie_weights()
    model.save_pretrained(tmp_path / "model")
    device_map = {**DEVICE_MAP, "model.embed_tokens": "disk", "lm_head": "disk"}
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.lm_head.weight.device.type == "meta"
    in_memory = tensor_bytes(model.state_dict())  # one storage: the tied weight counts once
    assert least_export_bytes(offloaded, "dense", 0.5) == in_memory  # before: + the embedding again
    target = tmp_path / "pruned"
    target.mkdir()
    assert write_pruned_model(offloaded, target, {}, save_format).dense_bytes == in_memory


class _LMEvalTask(_LMTask):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.calibration_loss(batch), batch_size=batch["input_ids"].shape[0])


def test_a_saved_pruned_model_offloaded_to_disk_is_evaluated_as_saved_without_an_offload_folder(saved, tmp_path):
    """README's "larger than one device" recipe, second step: the saved folder evaluated with `device_map` and the
    default stages. It is not pruned again, so its weights on disk need no offload folder (before: refused, as for a
    model to prune)."""
    _, _, offloaded = saved
    config = {"sparsity": 0.5, "importance": "uniform", "progress": False}
    callback = ECoFLaPPruning(**config, stages=["fit"], save_to=str(tmp_path / "pruned"))
    EcoflapTrainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=tmp_path
    ).prune(_LMTask(offloaded), datamodule=_LMData())
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned", device_map=DEVICE_MAP).eval()
    assert reloaded.model.layers[2].mlp.up_proj.weight.device.type == "meta"  # read from the folder's own file
    callback = ECoFLaPPruning(**config)  # stages fit, validate, test
    metrics = quiet_trainer(default_root_dir=tmp_path / "eval", callbacks=[callback]).validate(
        _LMEvalTask(reloaded), dataloaders=_LMData().train_dataloader()
    )
    assert callback.masks_from == f"the saved model {tmp_path / 'pruned'}" and metrics[0]["val/loss"] > 0
