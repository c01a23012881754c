"""The fine step's replay on the processor-encoded families: every block, replayed on its recorded arguments with
the hidden stream of the block before it, gives exactly the hidden states of the model's own forward pass.

This covers grouped-query attention and rotary embeddings (every generator's language model), Qwen-VL's
multimodal (3-D) rotary positions, Qwen2.5-VL's windowed vision attention (windowed and full-attention blocks get
different ``cu_seqlens``), LLaVA's penultimate-layer features, PaliGemma's prefix attention (``token_type_ids``),
InstructBLIP's FlanT5 position biases and SigLIP's two towers.
"""

from __future__ import annotations

import pytest
import torch

from ecoflap_pl import PruningConfig, prune
from ecoflap_pl.pruning.calls import capture_block_calls
from ecoflap_pl.pruning.discovery import find_stacks, order_stacks
from ecoflap_pl.pruning.transaction import pruning_session
from tests.models.family_batches import GENERATIVE, family_case
from tests.pruning.pruning_helpers import own_block_outputs

EXPECTED_STACKS = {
    "llava": ["model.vision_tower.encoder.layers", "model.language_model.layers"],
    "qwen2_vl": ["model.visual.blocks", "model.language_model.layers"],
    "qwen2_5_vl": ["model.visual.blocks", "model.language_model.layers"],
    "instructblip": [
        "vision_model.encoder.layers",
        "qformer.encoder.layer",
        "language_model.encoder.block",
        "language_model.decoder.block",
    ],
    "paligemma": ["model.vision_tower.encoder.layers", "model.language_model.layers"],
    "siglip": ["vision_model.encoder.layers", "text_model.encoder.layers"],
}


@pytest.mark.parametrize("family", [*GENERATIVE, "siglip"])
def test_replaying_dense_blocks_reproduces_the_models_own_hidden_states(family):
    model, batches, loss_fn = family_case(family)
    with pruning_session(model), torch.no_grad():
        stacks, never_ran = order_stacks(model, find_stacks(model), lambda: loss_fn(model, batches[0]))
        assert [stack.name for stack in stacks] == EXPECTED_STACKS[family] and never_ran == []
        for stack in stacks:
            blocks = [model.get_submodule(name) for name in stack.blocks]
            expected = own_block_outputs(model, blocks, batches, loss_fn)
            calls = capture_block_calls(blocks, batches, lambda batch: loss_fn(model, batch), keep_hidden=True)
            for call_index, first in enumerate(calls[0]):
                hidden = first.hidden
                for index, block in enumerate(blocks):
                    hidden = calls[index][call_index].replay(block, hidden)
                    assert torch.equal(hidden, expected[index][call_index]), (stack.name, index, call_index)


def _first_calls(model, stack_name, batch, loss_fn):
    blocks = list(model.get_submodule(stack_name))
    with pruning_session(model), torch.no_grad():
        return [block_calls[0] for block_calls in capture_block_calls(blocks, [batch], lambda b: loss_fn(model, b))]


def test_qwen2_5_vl_cases_are_the_hard_ones():
    """What the replay test above covers on Qwen2.5-VL: windowed and full vision attention, multimodal rotary
    positions (not the plain 1-D ones), grouped-query attention."""
    model, batches, loss_fn = family_case("qwen2_5_vl")
    vision = _first_calls(model, "model.visual.blocks", batches[0], loss_fn)
    windowed, full = vision[0].kwargs["cu_seqlens"], vision[1].kwargs["cu_seqlens"]
    assert 1 in model.config.vision_config.fullatt_block_indexes and len(windowed) > len(full)
    language = _first_calls(model, "model.language_model.layers", batches[0], loss_fn)
    cos, _ = language[0].kwargs["position_embeddings"]
    length = cos.shape[1]
    plain = torch.arange(length).unsqueeze(0).expand(cos.shape[0], -1)
    hidden = torch.zeros(cos.shape[0], length, model.config.text_config.hidden_size)
    plain_cos, _ = model.model.language_model.rotary_emb(hidden, plain.unsqueeze(0).expand(3, -1, -1))
    assert not torch.allclose(cos, plain_cos)
    attention = model.model.language_model.layers[0].self_attn
    assert attention.k_proj.out_features < attention.q_proj.out_features


@pytest.mark.parametrize("family", ["qwen2_5_vl", "instructblip"])
def test_activations_kept_on_the_cpu_give_the_same_masks(family):
    """``activation_storage="cpu"``: recorded block calls and propagated hidden states stored apart from the model
    (nested tuples of rotary tables, T5 position biases) are moved back for each replay; the masks do not change."""
    results = []
    for storage in ("device", "cpu"):
        model, batches, loss_fn = family_case(family)
        config = PruningConfig(sparsity=0.5, importance="uniform", fine_samples=6, activation_storage=storage)
        results.append(prune(model, batches, loss_fn, config))
    for name, mask in results[0].masks.items():
        assert torch.equal(results[1].masks[name], mask), name
