"""Passing per-sample scales to the layers: batch independence, CFG doubling, no leaked state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ec_lora_t.conditioning import engagement_conditioning
from ec_lora_t.lora import ec_lora_layers, lora_parameters
from ec_lora_toys import WIDTH, randomize_adapter, toy_with_adapter


def trained_toy():
    model, ecm, config = toy_with_adapter()
    randomize_adapter(model, ecm)
    return model, ecm


def test_mixed_vectors_give_each_sample_its_solo_output():
    model, ecm = trained_toy()
    sample = torch.randn(4, 5, WIDTH)
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.2], [0.5, 0.9], [0.3, 0.3]])
    with engagement_conditioning(model, ecm, vectors):
        batched = model(sample)
    for row in range(4):
        with engagement_conditioning(model, ecm, vectors[row : row + 1]):
            alone = model(sample[row : row + 1])
        assert torch.allclose(batched[row], alone[0], atol=1e-6)
    # ...and the vector matters: two vectors give two different outputs for one sample.
    with engagement_conditioning(model, ecm, vectors[:2]):
        pair = model(sample[:1].repeat(2, 1, 1))
    assert not torch.allclose(pair[0], pair[1], atol=1e-4)


def test_classifier_free_guidance_doubling_repeats_the_scales():
    model, ecm = trained_toy()
    sample = torch.randn(3, 5, WIDTH)
    vectors = torch.tensor([[0.0, 0.1], [0.7, 0.2], [1.0, 1.0]])
    with engagement_conditioning(model, ecm, vectors):
        single = model(sample)
        doubled = model(torch.cat([sample] * 2))  # [uncond, cond] as a pipeline with CFG does
    assert torch.allclose(doubled[:3], single, atol=1e-6)
    assert torch.allclose(doubled[3:], single, atol=1e-6)
    with engagement_conditioning(model, ecm, vectors), pytest.raises(RuntimeError, match="not a multiple"):
        model(torch.randn(4, 5, WIDTH))


def test_no_state_left_behind_when_forward_raises():
    model, ecm = trained_toy()
    hooks_before = len(model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="shape"):
        with engagement_conditioning(model, ecm, torch.rand(2, 2)):
            model(torch.randn(2, 5, WIDTH + 1))  # wrong width: the forward raises mid-way
    assert all(layer.dynamic_scale is None for layer in ec_lora_layers(model).values())
    assert len(model._forward_pre_hooks) == hooks_before
    with pytest.raises(RuntimeError, match="without a dynamic scale"):
        model(torch.randn(2, 5, WIDTH))  # outside a block the adapter refuses to run
    with engagement_conditioning(model, mode="plain_lora"):  # and a new block works again
        model(torch.randn(2, 5, WIDTH))


def test_nested_blocks_and_bad_arguments_are_refused():
    model, ecm = trained_toy()
    with engagement_conditioning(model, mode="base"):
        with pytest.raises(RuntimeError, match="already inside"):
            with engagement_conditioning(model, ecm, torch.rand(1, 2)):
                pass
    with pytest.raises(ValueError, match="mode"):
        with engagement_conditioning(model, mode="ecm"):
            pass
    with pytest.raises(ValueError, match="needs the ECM"):
        with engagement_conditioning(model, ecm, None):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with engagement_conditioning(model, ecm, torch.tensor([[float("nan"), 0.5]])):
            pass


class CheckpointedToy(nn.Module):
    """Runs the wrapped toy under non-reentrant activation checkpointing, as diffusers does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, sample, use_reentrant=False)


@pytest.mark.parametrize("use_checkpointing", [False, True])
def test_gradients_reach_lora_and_ecm_with_and_without_checkpointing(use_checkpointing):
    model, ecm = trained_toy()
    runner = CheckpointedToy(model) if use_checkpointing else model
    sample, vectors = torch.randn(2, 5, WIDTH), torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    with engagement_conditioning(runner, ecm, vectors):
        runner(sample).square().mean().backward()
    gradients = [p.grad for p in lora_parameters(model) + list(ecm.parameters())]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in gradients)
    if use_checkpointing:  # recomputation must see the same scales: same gradients as without it
        reference_model, reference_ecm = trained_toy()
        with engagement_conditioning(reference_model, reference_ecm, vectors):
            reference_model(sample).square().mean().backward()
        for checkpointed, plain in zip(lora_parameters(model), lora_parameters(reference_model)):
            assert torch.allclose(checkpointed.grad, plain.grad, atol=1e-6)
        for checkpointed, plain in zip(ecm.parameters(), reference_ecm.parameters()):
            assert torch.allclose(checkpointed.grad, plain.grad, atol=1e-6)


def test_rank_granularity_mixed_vectors_give_each_sample_its_solo_output():
    model, ecm, _ = toy_with_adapter(ecm_granularity="rank")
    randomize_adapter(model, ecm)
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.3], [0.4, 1.0]])
    sample = torch.randn(3, 5, WIDTH)
    with engagement_conditioning(model, ecm, vectors):
        batched = model(sample)
    for row in range(3):
        with engagement_conditioning(model, ecm, vectors[row : row + 1]):
            torch.testing.assert_close(batched[row : row + 1], model(sample[row : row + 1]))
    # classifier-free guidance: a doubled batch gets the same scales twice
    with engagement_conditioning(model, ecm, vectors):
        doubled = model(torch.cat([sample, sample]))
    torch.testing.assert_close(doubled[:3], doubled[3:])
