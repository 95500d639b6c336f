"""Passing per-row scales to the layers: batch independence, row layouts, no leaked state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ec_lora_toys import WIDTH, conditioned, randomize_adapter, toy_with_adapter
from torch import nn
from torch.utils.checkpoint import checkpoint

from ec_lora_t.adapter import build_ecm, ecm_outputs, engagement_conditioning, row_conditioning, unet_rows


def trained_toy(**config_overrides):
    model, adapter = toy_with_adapter(**config_overrides)
    randomize_adapter(adapter)
    return model, adapter


@pytest.mark.parametrize("granularity", ["layer", "rank"])
def test_mixed_vectors_give_each_sample_its_solo_output(granularity):
    model, adapter = trained_toy(ecm_granularity=granularity)
    sample = torch.randn(4, 5, WIDTH)
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.2], [0.5, 0.9], [0.3, 0.3]])
    with conditioned(adapter, vectors):
        batched = model(sample)
    for row in range(4):
        with conditioned(adapter, vectors[row : row + 1]):
            alone = model(sample[row : row + 1])
        torch.testing.assert_close(batched[row], alone[0], atol=1e-6, rtol=1e-5)
    # ...and the vector matters: two vectors give two different outputs for one sample.
    with conditioned(adapter, vectors[:2]):
        pair = model(sample[:1].repeat(2, 1, 1))
    assert not torch.allclose(pair[0], pair[1], atol=1e-4)


def test_unet_rows_lay_out_negative_conditional_and_anchor_groups():
    _, adapter = trained_toy()
    # An ECM with a time-embedding head, so that the offsets' layout is checked too.
    config = dataclasses.replace(adapter.config, vector_embedding=True, time_embedding_dim=WIDTH)
    ecm = build_ecm(config)
    with torch.no_grad():
        ecm.embedding.weight.normal_()
    vectors, anchor = torch.tensor([[0.0, 0.1], [1.0, 0.9]]), (0.3, 0.6)
    text, negative = torch.randn(2, 3, WIDTH), torch.randn(2, 3, WIDTH)
    rows = unet_rows(ecm, "ec_lora", text, vectors, negative_prompt_embeds=negative, anchor_row=True,
                     guidance_anchor=anchor)
    assert rows.groups == 3
    torch.testing.assert_close(rows.text_embeddings, torch.cat([negative, text, text]))
    scales, offsets = ecm_outputs(ecm, vectors)
    anchor_scales, anchor_offsets = ecm_outputs(ecm, torch.tensor([anchor, anchor]))
    torch.testing.assert_close(rows.scales, torch.cat([scales, scales, anchor_scales]))
    torch.testing.assert_close(rows.offsets, torch.cat([offsets, offsets, anchor_offsets]))
    assert rows.anchor_groups == 1 and rows.without_anchor_groups().groups == 2
    # Time guidance of its own: a fourth group at (each row's engagement, the anchor's time).
    rows = unet_rows(ecm, "ec_lora", text, vectors, negative_prompt_embeds=negative, anchor_row=True,
                     engagement_anchor_row=True, guidance_anchor=anchor)
    assert (rows.groups, rows.anchor_groups) == (4, 2)
    engagement_scales, engagement_offsets = ecm_outputs(ecm, torch.tensor([[0.0, 0.6], [1.0, 0.6]]))
    torch.testing.assert_close(rows.scales, torch.cat([scales, scales, anchor_scales, engagement_scales]))
    torch.testing.assert_close(rows.offsets, torch.cat([offsets, offsets, anchor_offsets, engagement_offsets]))
    unguided = rows.without_anchor_groups()
    assert unguided.groups == 2 and unguided.anchor_groups == 0
    torch.testing.assert_close(unguided.text_embeddings, torch.cat([negative, text]))
    torch.testing.assert_close(unguided.scales, torch.cat([scales, scales]))
    with pytest.raises(ValueError, match="needs an \\(engagement, time\\) anchor"):
        unet_rows(ecm, "ec_lora", text, vectors, anchor_row=True, engagement_anchor_row=True, guidance_anchor=None)
    # Without text guidance: [text + vector, text + anchor]; anchor None is the null vector.
    rows = unet_rows(ecm, "ec_lora", text, vectors, anchor_row=True, guidance_anchor=None)
    torch.testing.assert_close(rows.text_embeddings, torch.cat([text, text]))
    torch.testing.assert_close(rows.scales, torch.cat([scales, torch.ones_like(scales)]))
    torch.testing.assert_close(rows.offsets, torch.cat([offsets, torch.zeros_like(offsets)]))
    # Training: one group; vector dropout gives the marked rows the null vector.
    rows = unet_rows(ecm, "ec_lora", text, vectors, null_rows=torch.tensor([False, True]))
    assert rows.groups == 1
    torch.testing.assert_close(rows.scales, torch.stack([scales[0], torch.ones_like(scales[1])]))
    torch.testing.assert_close(rows.offsets, torch.stack([offsets[0], torch.zeros_like(offsets[1])]))
    # Modes without the ECM: one constant for every row, no offsets; no anchor row to guide along.
    rows = unet_rows(ecm, "plain_lora", text, None, negative_prompt_embeds=negative)
    assert (rows.scales, rows.offsets, rows.groups) == (1.0, None, 2)
    with pytest.raises(ValueError, match="needs mode 'ec_lora'"):
        unet_rows(ecm, "base", text, None, anchor_row=True)


@pytest.mark.parametrize("anchor", [(0.2, 0.8), None])
def test_vector_scale_extrapolates_from_the_configured_anchor(anchor):
    model, adapter = trained_toy()
    vectors = torch.tensor([[0.9, 0.1], [0.4, 0.7]])
    scales, _ = ecm_outputs(adapter.ecm, vectors)
    origin = ecm_outputs(adapter.ecm, torch.tensor([anchor] * 2))[0] if anchor else torch.ones_like(scales)
    extrapolated, _ = row_conditioning(adapter.ecm, "ec_lora", vectors, vector_scale=2.5, anchor=anchor)
    torch.testing.assert_close(extrapolated, origin + 2.5 * (scales - origin))
    # γ = 0 lands on the anchor itself; the average post is not what the anchor (0.2, 0.8) extrapolates from.
    at_anchor, _ = row_conditioning(adapter.ecm, "ec_lora", vectors, vector_scale=0.0, anchor=anchor)
    torch.testing.assert_close(at_anchor, origin)
    average = ecm_outputs(adapter.ecm, torch.tensor([[0.5, 0.5]] * 2))[0]
    assert not torch.allclose(at_anchor, average, atol=1e-3)


def test_a_batch_the_scales_were_not_built_for_raises():
    model, adapter = trained_toy()
    with conditioned(adapter, torch.rand(3, 2)), pytest.raises(RuntimeError, match="scales for 3 rows"):
        model(torch.randn(6, 5, WIDTH))  # e.g. a guidance batch laid out without unet_rows
    with pytest.raises(ValueError, match="scales must be"):
        with engagement_conditioning(adapter, torch.ones(2, 3)):  # 3 columns, the toy has 6 layers
            pass


def test_no_state_left_behind_when_forward_raises():
    model, adapter = trained_toy()
    with pytest.raises(RuntimeError, match="shape"):
        with conditioned(adapter, torch.rand(2, 2)):
            model(torch.randn(2, 5, WIDTH + 1))  # wrong width: the forward raises mid-way
    assert all(layer.dynamic_scale is None for layer in adapter.layers)
    assert not adapter.conditioning_active
    with pytest.raises(RuntimeError, match="without a dynamic scale"):
        model(torch.randn(2, 5, WIDTH))  # outside a block the adapter refuses to run
    with conditioned(adapter, mode="plain_lora"):  # and a new block works again
        model(torch.randn(2, 5, WIDTH))


def test_nested_blocks_and_bad_arguments_are_refused():
    model, adapter = trained_toy()
    with conditioned(adapter, mode="base"):
        with pytest.raises(RuntimeError, match="already inside"):
            with conditioned(adapter, torch.rand(1, 2)):
                pass
    with pytest.raises(ValueError, match="mode"):
        with conditioned(adapter, mode="ecm"):
            pass
    with pytest.raises(ValueError, match="needs an engagement_time"):
        with conditioned(adapter, None):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with conditioned(adapter, torch.tensor([[float("nan"), 0.5]])):
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
    model, adapter = trained_toy()
    runner = CheckpointedToy(model) if use_checkpointing else model
    sample, vectors = torch.randn(2, 5, WIDTH), torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    with conditioned(adapter, vectors):
        runner(sample).square().mean().backward()
    gradients = [p.grad for p in adapter.lora_parameters() + list(adapter.ecm.parameters())]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in gradients)
    if use_checkpointing:  # recomputation must see the same scales: same gradients as without it
        reference_model, reference = trained_toy()
        with conditioned(reference, vectors):
            reference_model(sample).square().mean().backward()
        for checkpointed, plain in zip(adapter.lora_parameters(), reference.lora_parameters()):
            assert torch.allclose(checkpointed.grad, plain.grad, atol=1e-6)
        for checkpointed, plain in zip(adapter.ecm.parameters(), reference.ecm.parameters()):
            assert torch.allclose(checkpointed.grad, plain.grad, atol=1e-6)


def test_injection_returns_the_layers_and_conditioning_never_walks_the_model(monkeypatch):
    model, adapter = trained_toy()
    # The adapter keeps its layers: entering a block must not look through the model's modules.
    monkeypatch.setattr(type(model), "named_modules", lambda *a, **k: (_ for _ in ()).throw(AssertionError("walked")))
    monkeypatch.setattr(type(model), "modules", lambda *a, **k: (_ for _ in ()).throw(AssertionError("walked")))
    with conditioned(adapter, torch.rand(2, 2)):
        model(torch.randn(2, 5, WIDTH))


def test_vector_embedding_offsets_the_time_embedding_per_row():
    """`vector_embedding`: an ECM head adds a per-row offset to the UNet's timestep embedding;
    it starts at zero (step 0 is the base model) and reaches the head's gradient."""
    from diffusers import UNet2DConditionModel

    from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 8), layers_per_block=1, cross_attention_dim=8, norm_num_groups=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
    )
    sample, timesteps, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 8)
    with torch.no_grad():
        reference = unet(sample, timesteps, text).sample
    adapter = add_ec_lora(unet, ECLoRAConfig(rank=2, alpha=2, ecm_hidden_size=8, vector_embedding=True))
    assert adapter.config.time_embedding_dim == unet.time_embedding.base_layer.linear_2.out_features
    vectors = torch.tensor([[0.0, 0.3], [1.0, 0.7]])
    with conditioned(adapter, vectors):
        torch.testing.assert_close(unet(sample, timesteps, text).sample, reference)  # zero-initialised head
    with torch.no_grad():
        adapter.ecm.embedding.weight.normal_()
    with conditioned(adapter, vectors):
        moved = unet(sample, timesteps, text).sample
        moved.square().mean().backward()
    assert not torch.allclose(moved, reference, atol=1e-4)
    assert torch.count_nonzero(adapter.ecm.embedding.weight.grad) > 0
    with conditioned(adapter, mode="base"):  # no vector: no offset
        torch.testing.assert_close(unet(sample, timesteps, text).sample, reference)
    with pytest.raises(RuntimeError, match="outside a conditioning block"):
        unet(sample, timesteps, text)
