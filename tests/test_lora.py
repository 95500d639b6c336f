"""EC-LoRA layer, injection, ECM and adapter files, on a toy module with UNet-like names."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from ec_lora_toys import (
    WIDTH,
    conditioned,
    make_toy,
    randomize_adapter,
    toy_with_adapter,
)
from torch import nn

from ec_lora_t.adapter import (
    ECLoRAConfig,
    ECLoRALinear,
    EngagementConditioningModule,
    add_ec_lora,
    inject_ec_lora,
    load_adapter,
    save_adapter,
)
from ec_lora_t.adapter.conditioning import engagement_conditioning, fold_scales, row_conditioning, scale_runs
from ec_lora_t.adapter.config import ADAPTER_CONFIG_NAME, MIN_ECM_INPUT_STD, with_ecm_input_statistics


def test_injection_wraps_targets_without_copying_base_weights():
    model = make_toy()
    base_weights = {name: module.weight for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    config = ECLoRAConfig(rank=4, alpha=8)
    layers = inject_ec_lora(model, config)

    expected = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    assert layers == [model.get_submodule(name) for name in expected]
    assert list(config.layer_names) == expected
    assert isinstance(model.proj_in, nn.Linear) and not isinstance(model.proj_in, ECLoRALinear)
    for index, (name, layer) in enumerate(zip(expected, layers)):
        assert layer.ecm_index == index
        assert layer.base_layer.weight is base_weights[name]  # wrapped, not cloned
        assert layer.lora_A.weight.dtype == torch.float32
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert torch.count_nonzero(layer.lora_A.weight) > 0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{m}.weight" for name in expected for m in "AB"}


def test_injection_rejects_no_match_and_double_injection():
    with pytest.raises(ValueError, match="matches target_modules"):
        inject_ec_lora(make_toy(), ECLoRAConfig(target_modules=("to_nothing",)))
    model, _ = toy_with_adapter()
    with pytest.raises(ValueError, match="already has EC-LoRA"):
        inject_ec_lora(model, ECLoRAConfig())


def test_ecm_starts_at_scale_one_and_shapes():
    ecm = EngagementConditioningModule(num_layers=5, hidden_size=16, depth=3)
    vectors = torch.tensor([[0.0, 0.0], [0.3, 0.9], [1.0, 1.0]])
    scales = ecm(vectors)
    assert scales.shape == (3, 5) and scales.dtype == torch.float32
    assert torch.equal(scales, torch.ones(3, 5))
    linear_layers = [m for m in ecm.mlp if isinstance(m, nn.Linear)]
    assert len(linear_layers) == 4  # depth 3 hidden layers + output
    with pytest.raises(ValueError, match="shape"):
        ecm(torch.zeros(3, 3))


def test_step_zero_is_the_base_model():
    reference = make_toy()
    model, adapter = toy_with_adapter()
    sample = torch.randn(3, 5, WIDTH)
    with conditioned(adapter, torch.rand(3, 2)):
        assert torch.allclose(model(sample), reference(sample), atol=1e-6)


def test_only_lora_and_ecm_parameters_change_after_training_steps():
    model, adapter = toy_with_adapter()
    before = {name: p.detach().clone() for name, p in [*model.named_parameters(), *adapter.ecm.named_parameters()]}
    ecm = adapter.ecm
    trainable = adapter.lora_parameters() + list(ecm.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    sample, target = torch.randn(4, 5, WIDTH), torch.randn(4, 5, WIDTH)
    vectors = torch.tensor([[0.1, 0.2], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    # Step 1 moves B off zero; from step 2 on A and the ECM output layer (zero at init) get
    # gradient, and from step 3 on the ECM's hidden layers too.
    for _ in range(3):
        with conditioned(adapter, vectors):
            loss = nn.functional.mse_loss(model(sample), target)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = dict([*model.named_parameters(), *ecm.named_parameters()])
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        expected_trainable = ".lora_" in name or name.startswith("mlp.")
        assert changed == expected_trainable, name


def test_zero_scale_gives_the_base_output():
    reference = make_toy()
    model, adapter = toy_with_adapter()
    randomize_adapter(adapter)
    sample = torch.randn(2, 5, WIDTH)
    with conditioned(adapter, mode="base"):
        assert torch.equal(model(sample), reference(sample))
    with torch.no_grad():  # an ECM that outputs 0 for every layer
        adapter.ecm.mlp[-1].weight.zero_()
        adapter.ecm.mlp[-1].bias.zero_()
    with conditioned(adapter, torch.rand(2, 2)):
        assert torch.allclose(model(sample), reference(sample), atol=1e-6)
    with conditioned(adapter, mode="plain_lora"):
        assert not torch.allclose(model(sample), reference(sample), atol=1e-3)  # the adapter does act


def test_plain_lora_equals_ec_lora_with_unit_scales():
    model, adapter = toy_with_adapter()
    randomize_adapter(adapter, ecm=False)  # ECM still at its init: every scale is 1
    sample = torch.randn(2, 5, WIDTH)
    with conditioned(adapter, torch.tensor([[0.2, 0.4], [1.0, 0.0]])):
        gated_output = model(sample)
    with conditioned(adapter, mode="plain_lora"):
        plain = model(sample)
    assert torch.allclose(gated_output, plain, atol=1e-6)


def test_base_layer_in_bf16_keeps_fp32_lora_and_output_dtype():
    model, adapter = toy_with_adapter()
    for layer in adapter.layers:
        layer.base_layer.to(torch.bfloat16)
    model.proj_in.to(torch.bfloat16)
    randomize_adapter(adapter)
    with conditioned(adapter, torch.rand(2, 2)):
        output = model(torch.randn(2, 5, WIDTH, dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapter.lora_parameters())


def test_save_load_round_trip(tmp_path):
    model, adapter = toy_with_adapter()
    randomize_adapter(adapter)
    save_adapter(tmp_path / "adapter", adapter)
    saved_config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert saved_config["layer_names"] == list(adapter.config.layer_names)

    loaded_model = make_toy()
    loaded = load_adapter(tmp_path / "adapter", loaded_model)
    assert loaded.config == adapter.config
    sample, vectors = torch.randn(3, 5, WIDTH), torch.rand(3, 2)
    with conditioned(adapter, vectors):
        original = model(sample)
    with conditioned(loaded, vectors):
        restored = loaded_model(sample)
    assert torch.equal(original, restored)


def ecm_pair(**input_transform):
    """A raw-input ECM and one with `input_transform`, same weights (output layer non-zero)."""
    torch.manual_seed(0)
    unit = EngagementConditioningModule(num_layers=3, hidden_size=8)
    nn.init.normal_(unit.mlp[-1].weight)
    transformed = EngagementConditioningModule(num_layers=3, hidden_size=8, **input_transform)
    transformed.load_state_dict(unit.state_dict())
    return unit, transformed


def assert_round_trip(tmp_path, model, adapter):
    """Saved and loaded into a fresh model, the adapter gives the same outputs for random vectors."""
    randomize_adapter(adapter)
    save_adapter(tmp_path / "adapter", adapter)
    loaded_model = make_toy()
    loaded = load_adapter(tmp_path / "adapter", loaded_model)
    sample, vectors = torch.randn(3, 5, WIDTH), torch.rand(3, 2)
    with conditioned(adapter, vectors):
        original = model(sample)
    with conditioned(loaded, vectors):
        assert torch.equal(loaded_model(sample), original)
    return loaded


def test_centered_ecm_input_reads_two_e_minus_one_and_survives_save_and_load(tmp_path):
    unit, centered = ecm_pair(input_shift=(0.5, 0.5), input_scale=(0.5, 0.5))
    vectors = torch.tensor([[0.0, 1.0], [0.25, 0.5], [1.0, 0.0]])
    assert torch.allclose(centered(vectors), unit(2 * vectors - 1))
    assert not torch.allclose(centered(vectors), unit(vectors))
    assert torch.allclose(centered(vectors[:1]), centered(vectors)[:1], atol=1e-6)  # row-wise, no batch coupling
    assert set(centered.state_dict()) == set(unit.state_dict())  # the transform is not a weight

    model, adapter = toy_with_adapter(ecm_input="centered")
    assert adapter.ecm.input_shift.tolist() == [0.5, 0.5] and adapter.ecm.input_scale.tolist() == [0.5, 0.5]
    loaded = assert_round_trip(tmp_path, model, adapter)
    assert loaded.config.ecm_input == "centered" and loaded.ecm.input_scale.tolist() == [0.5, 0.5]
    # An adapter saved before the option existed has no key and reads the vector raw.
    config_path = tmp_path / "adapter" / ADAPTER_CONFIG_NAME
    config = json.loads(config_path.read_text())
    del config["ecm_input"], config["ecm_input_mean"], config["ecm_input_std"]
    config_path.write_text(json.dumps(config))
    old = load_adapter(tmp_path / "adapter", make_toy())
    assert old.ecm.input_shift.tolist() == [0.0, 0.0] and old.ecm.input_scale.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="ecm_input"):
        ECLoRAConfig(ecm_input="standardised")
    with pytest.raises(ValueError, match="input_scale positive"):
        EngagementConditioningModule(num_layers=3, input_scale=(0.0, 1.0))


def test_standardized_ecm_input_reads_z_scores_of_the_training_set_and_keeps_them(tmp_path):
    training_vectors = torch.tensor([[0.0, 0.0], [0.5, 0.2], [1.0, 0.4], [0.5, 1.0]])
    config = with_ecm_input_statistics(ECLoRAConfig(ecm_input="standardized"), training_vectors)
    mean, std = training_vectors.mean(0), training_vectors.std(0, correction=0)
    assert config.ecm_input_mean == pytest.approx(mean.tolist()) and config.ecm_input_std == pytest.approx(std.tolist())
    unit, standardized = ecm_pair(input_shift=config.ecm_input_mean, input_scale=config.ecm_input_std)
    vectors = torch.tensor([[0.0, 1.0], [0.25, 0.5], [1.0, 0.0]])
    assert torch.allclose(standardized(vectors), unit((vectors - mean) / std), atol=1e-6)
    # The other inputs take no statistics; without them standardized cannot build an ECM.
    assert with_ecm_input_statistics(ECLoRAConfig(ecm_input="centered"), training_vectors).ecm_input_mean is None
    with pytest.raises(ValueError, match="with_ecm_input_statistics"):
        ECLoRAConfig(ecm_input="standardized").ecm_input_affine()
    with pytest.raises(ValueError, match="ecm_input_std"):
        ECLoRAConfig(ecm_input="standardized", ecm_input_mean=(0.5, 0.5), ecm_input_std=(float("nan"), 0.2))
    # A feed whose posts nearly all share one value: the divisor stops at MIN_ECM_INPUT_STD.
    narrow = with_ecm_input_statistics(ECLoRAConfig(ecm_input="standardized"), [[0.5, 0.0], [0.5, 1.0], [0.52, 0.5]])
    assert narrow.ecm_input_affine()[1][0] == MIN_ECM_INPUT_STD and narrow.ecm_input_affine()[1][1] > MIN_ECM_INPUT_STD

    model = make_toy()
    adapter = add_ec_lora(model, replace(config, rank=4, alpha=8, ecm_hidden_size=16))
    loaded = assert_round_trip(tmp_path, model, adapter)
    assert loaded.config.ecm_input_mean == config.ecm_input_mean and loaded.config.ecm_input_std == config.ecm_input_std
    assert torch.allclose(loaded.ecm.input_shift, mean) and torch.allclose(loaded.ecm.input_scale, std)


def test_load_rejects_other_architecture_and_missing_files(tmp_path):
    model, adapter = toy_with_adapter()
    save_adapter(tmp_path / "adapter", adapter)
    other = make_toy()
    other.attn1.to_k = nn.Identity()  # a different architecture: one target layer fewer
    with pytest.raises(ValueError, match="differ from the adapter's layer_names"):
        load_adapter(tmp_path / "adapter", other)
    (tmp_path / "adapter" / "ecm.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ecm.safetensors"):
        load_adapter(tmp_path / "adapter", make_toy())


def test_rank_granularity_starts_as_plain_lora_and_gates_each_component():
    """ecm_granularity 'rank': B diag(s(e)) A x, one ECM scale per layer and rank component."""
    model, adapter = toy_with_adapter(ecm_granularity="rank")
    config, ecm = adapter.config, adapter.ecm
    assert config.scales_per_layer == config.rank
    vectors = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert ecm(vectors).shape == (2, len(config.layer_names), config.rank)
    randomize_adapter(adapter, ecm=False)  # B non-zero, ECM output still at its init (every gate 1)
    sample = torch.randn(2, 3, WIDTH)
    with conditioned(adapter, vectors):
        gated_output = model(sample)
    with conditioned(adapter, mode="plain_lora"):
        plain = model(sample)
    torch.testing.assert_close(gated_output, plain)

    # Gates that switch off every rank component but the first equal a rank-1 update.
    with torch.no_grad():
        ecm.mlp[-1].bias.copy_(torch.tensor([1.0] + [0.0] * (config.rank - 1)).repeat(len(config.layer_names)))
    reference = make_toy()  # the same base weights, with the rank-1 updates merged in
    for name, layer in zip(config.layer_names, adapter.layers):
        with torch.no_grad():
            reference.get_submodule(name).weight += config.static_scale * (
                layer.lora_B.weight[:, :1] @ layer.lora_A.weight[:1]
            )
    with conditioned(adapter, vectors):
        gated = model(sample)
    torch.testing.assert_close(gated, reference(sample))


def test_scale_runs_join_rows_that_differ_by_rounding_only():
    """Rows of one vector share a run even when a batched matmul rounded them apart (one ulp);
    rows whose scales differ by a real amount start a new one."""
    scales = torch.tensor([[1.0, 0.5], [1.0, 0.5], [0.9, 0.5], [0.9, 0.5]])
    rounded = scales.clone()
    rounded[1] = torch.nextafter(rounded[1], torch.full_like(rounded[1], 2.0))
    assert not torch.equal(rounded[0], rounded[1])
    assert scale_runs(rounded) == scale_runs(scales) == (0, 2, 4)
    moved = scales.clone()
    moved[3, 1] += 1e-3
    assert scale_runs(moved) == (0, 2, 3, 4)


@pytest.mark.parametrize("granularity", ["layer", "rank"])
def test_folded_scales_equal_the_low_rank_path_per_run_of_rows(granularity):
    """Sampling's folded path, W' = W + s (alpha / r) B A per run of rows sharing a vector, is the
    per-row low-rank path's arithmetic (float64, so that only the order of the sums differs)."""
    model, adapter = toy_with_adapter(ecm_granularity=granularity)
    randomize_adapter(adapter)
    model.double()
    adapter.ecm.double()
    # rows: two of one vector, one of another, two of the first again: three runs
    vectors = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.7], [0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    sample = torch.randn(5, 3, WIDTH, dtype=torch.float64)
    scales, _ = row_conditioning(adapter.ecm, "ec_lora", vectors)
    assert scale_runs(scales) == (0, 2, 3, 5)
    with torch.no_grad():
        with engagement_conditioning(adapter, scales):
            low_rank = model(sample)
        folded = fold_scales(adapter, scales, max_runs=3)
        assert len(folded) == len(adapter.layers) and folded[0].bounds == (0, 2, 3, 5)
        with engagement_conditioning(adapter, scales, folded=folded):
            assert type(adapter.layers[0].dynamic_scale).__name__ == "FoldedWeights"
            torch.testing.assert_close(model(sample), low_rank, atol=1e-12, rtol=1e-12)
        # the weights folded at another vector give another output: the fold is not a no-op
        other, _ = row_conditioning(adapter.ecm, "ec_lora", vectors[[2, 2, 0, 2, 2]])  # the two vectors swapped
        with engagement_conditioning(adapter, scales, folded=fold_scales(adapter, other, max_runs=3)):
            assert not torch.allclose(model(sample), low_rank, atol=1e-3)
        with engagement_conditioning(adapter, scales, folded=folded), pytest.raises(RuntimeError, match="folded"):
            model(sample[:4])  # a batch its runs do not fit
    # more runs than allowed, constant scales, or folding switched off: no folded weights
    assert fold_scales(adapter, scales, max_runs=2) is None
    assert fold_scales(adapter, 1.0, max_runs=3) is None and fold_scales(adapter, scales, max_runs=0) is None
    with pytest.raises(ValueError, match="folded weights for 1 layers"):
        with engagement_conditioning(adapter, scales, folded=folded[:1]):
            pass
