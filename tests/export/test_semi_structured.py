"""2:4 weights on semi-structured sparse kernels: refused clearly off CUDA; on a GPU, outputs of the masked model."""

from __future__ import annotations

import pytest
import torch

from ecoflap_pl.export.semi_structured import check_semi_structured, to_semi_structured_
from ecoflap_pl.models.tiny import tiny_model
from ecoflap_pl.pruning.masks import apply_mask_, nm_mask


def test_refused_off_cuda_and_for_masks_that_are_not_2_4() -> None:
    with pytest.raises(ValueError, match="needs a CUDA GPU .* runs on cpu. HINT: run on a GPU"):
        check_semi_structured("2:4", torch.device("cpu"))
    with pytest.raises(ValueError, match="`structure` is 'unstructured'. HINT: prune with structure '2:4'"):
        check_semi_structured("unstructured", torch.device("cpu"))


def test_refused_on_a_machine_without_cuda_before_the_device_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where tests run on a GPU one
    with pytest.raises(ValueError, match="needs a CUDA GPU .* torch sees no CUDA GPU on this machine. HINT"):
        check_semi_structured("2:4")


@pytest.mark.gpu
def test_outputs_equal_the_masked_dense_model_within_bf16_tolerance() -> None:
    device = torch.device("cuda")
    check_semi_structured("2:4", device)
    model = tiny_model("llama", hidden_size=128).to(device, torch.bfloat16)
    masks = {}
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            masks[name] = nm_mask(param.detach().float().abs(), 2, 4)
            apply_mask_(param, masks[name])
    input_ids = torch.randint(8, 100, (16, 32), device=device)
    with torch.no_grad():
        dense = model(input_ids=input_ids).logits.float()
        swapped = to_semi_structured_(model, masks)
        sparse = model(input_ids=input_ids).logits.float()
    assert sorted(swapped) == sorted(masks)
    assert type(model.get_parameter(swapped[0])).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(sparse, dense, rtol=1.6e-2, atol=1e-2)


def test_weights_the_kernels_do_not_take_are_counted_as_matrices() -> None:
    """fp32 weights (here on the CPU, which has no kernels either) stay dense: the refusal said "none of the 14 pruned
    weights", of 14 weight matrices holding 18,432 weights (CASES 238)."""
    model = tiny_model("llama")
    masks = {}
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            masks[name] = nm_mask(param.detach().abs(), 2, 4)
            apply_mask_(param, masks[name])
    with pytest.raises(ValueError, match=f"none of the {len(masks)} pruned weight matrices fits the sparse kernels"):
        to_semi_structured_(model, masks)
