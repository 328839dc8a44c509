"""Decoders that only look like the Llama family: MLP blocks with the same projection names that compute more, native
Mixture-of-Experts layers, attention without q/k/v projections. The adapter refuses what it would change and warns
about what it leaves out."""

import warnings

import pytest
import torch
from peft import get_peft_model
from transformers.models.llama.modeling_llama import LlamaMLP

import peft_mole
from tests.helpers import tiny_base


class ScaledMLP(LlamaMLP):  # Falcon-H1's mlp_multipliers
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x) * 0.5) * self.up_proj(x)) * 2.0


class NormedMLP(LlamaMLP):  # BitNet's sub-norm before down_proj
    def forward(self, x):
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6))


class ClampedMLP(LlamaMLP):  # a SwiGLU limit: only inputs far larger than a random init's reach it
    limit = 7.0

    def forward(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).clamp(-self.limit, self.limit))


class FarClampedMLP(ClampedMLP):  # a limit past what gate outputs of 64 reach (products up to about 64²)
    limit = 1e4


def with_mlp(mlp_cls):
    base = tiny_base()
    for layer in base.model.layers:
        replaced = mlp_cls(base.config)
        replaced.load_state_dict(layer.mlp.state_dict())
        layer.mlp = replaced
    return base


@pytest.mark.parametrize("mlp_cls", [ScaledMLP, NormedMLP, ClampedMLP, FarClampedMLP])
@pytest.mark.parametrize("config", [
    peft_mole.MixLoRAConfig(num_experts=2, top_k=1, r=4), peft_mole.DynMoLEConfig(num_experts=2, r=4),
], ids=["mixlora", "dynmole-block"])
def test_a_block_that_computes_more_than_the_gated_formula_is_refused(mlp_cls, config):
    """Before: wrapped without a word, and a fresh adapter moved the logits off the base's (BitNet 0.65)."""
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.mlp \({mlp_cls.__name__}\) does not compute "
                                         r"down_proj\(act_fn\(gate_proj\(x\)\) \* up_proj\(x\)\).*router_scope="
                                         r"'projection'"):
        get_peft_model(with_mlp(mlp_cls), config)


def test_only_the_largest_probe_sees_a_clamp_set_far_past_the_activations(monkeypatch):
    from peft_mole.tuners.mixlora import block_check

    monkeypatch.setattr(block_check, "LARGE_GATES", (64.0,))  # as before 2026-12-07: wrapped without a word
    get_peft_model(with_mlp(FarClampedMLP), peft_mole.MixLoRAConfig(num_experts=2, top_k=1, r=4))


def test_projection_scope_keeps_such_a_block_and_equals_the_base_at_init():
    base = with_mlp(NormedMLP)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = get_peft_model(base, peft_mole.DynMoLEConfig(num_experts=2, r=4, router_scope="projection")).eval()
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_the_check_leaves_every_module_in_its_mode():
    base = tiny_base().train()
    base.model.layers[0].mlp.act_fn.eval()  # a submodule in another mode than its block
    model = get_peft_model(base, peft_mole.MixLoRAConfig(num_experts=2, top_k=1, r=4))
    assert [name for name, m in model.named_modules() if not m.training] == ["base_model.model.model.layers.0.mlp."
                                                                              "base_layer.act_fn"]


def native_moe(**overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                      num_experts=4, num_experts_per_tok=2, pad_token_id=0), **overrides})
    return Qwen3MoeForCausalLM(config)


def test_a_native_moe_base_without_dense_mlp_is_refused_as_such():
    with pytest.raises(ValueError, match=r"holds routed experts as stacked parameters \(a native Mixture-of-Experts"):
        get_peft_model(native_moe(), peft_mole.MixLoRAConfig(num_experts=2, top_k=1))


def test_layers_left_without_experts_warn():
    """Before: a Qwen3-MoE base with one dense layer was adapted in that layer alone, without a word."""
    with pytest.warns(UserWarning, match=r"1 decoder layer\(s\) have no gated MLP block .*: model\.layers\.1 "):
        model = get_peft_model(native_moe(mlp_only_layers=[0]), peft_mole.MixLoRAConfig(num_experts=2, top_k=1))
    routed = {name.split(".mlp")[0] for name, _ in model.named_parameters() if "router" in name}
    assert routed == {"base_model.model.model.layers.0"}


def test_attention_names_that_match_nothing_warn():
    """Before: multi-head latent attention (no q/k/v_proj) got LoRA on o_proj alone, without a word."""
    base = tiny_base()
    for layer in base.model.layers:  # attention without a k_proj
        layer.self_attn.k_linear = layer.self_attn.k_proj
        del layer.self_attn.k_proj
    with pytest.warns(UserWarning, match=r"attn_target_modules \['k_proj'\] match no linear layer"):
        get_peft_model(base, peft_mole.MixLoRAConfig(num_experts=2, top_k=1, attn_target_modules=["q_proj", "k_proj"]))


def test_a_plain_llama_is_covered_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(tiny_base(), peft_mole.MixLoRAConfig(num_experts=2, top_k=1))


def test_the_check_runs_under_other_jobs_lora_wrappers():
    """Multi-job training: two LoRA jobs wrap gate/up/down before a MixLoRA job's block wraps the MLP; the check runs
    the block without their deltas (before: 'peft-mole layers run one adapter per row; 2 adapters are active')."""
    from peft import LoraConfig

    from peft_mole.multijob import MultiJobModel

    lora = LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    model = MultiJobModel(tiny_base(), {"a": lora, "b": lora, "c": peft_mole.MixLoRAConfig(num_experts=2, top_k=1)})
    assert sorted(model.peft_config) == ["a", "b", "c"]
    assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "_disable_adapters"))


def test_blocks_and_layers_left_out_by_layers_to_transform_are_neither_checked_nor_warned_about():
    """Before: the check and the warnings ran before the `layers_to_transform` filter (a model with an unusual
    block in a layer the user left out was refused; a left-out layer was said to get attention LoRA)."""
    base = tiny_base()
    clamped = ClampedMLP(base.config)
    clamped.load_state_dict(base.model.layers[0].mlp.state_dict())
    base.model.layers[0].mlp = clamped
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(base, peft_mole.MixLoRAConfig(num_experts=2, top_k=1, layers_to_transform=[1]))
        assert {n.split(".mlp")[0] for n, _ in model.named_parameters() if "router" in n} == {
            "base_model.model.model.layers.1"}
        get_peft_model(native_moe(mlp_only_layers=[0]),
                       peft_mole.MixLoRAConfig(num_experts=2, top_k=1, layers_to_transform=[0]))


def test_a_per_layer_expert_list_counts_every_decoder_layer_of_a_partly_native_moe_base():
    """Layers without a gated MLP (`mlp_only_layers`: the others are native MoE) still take an entry of a per-layer
    `num_experts`, as it is indexed by the decoder layer (before 2026-12-08 every list length was refused there)."""
    with pytest.warns(UserWarning, match="have no gated MLP block"):
        model = get_peft_model(native_moe(num_hidden_layers=3, mlp_only_layers=[2]),
                               peft_mole.DynMoLEConfig(num_experts=[2, 3, 4], r=2))
    routers = {name: p.shape[0] for name, p in model.named_parameters() if "router" in name}
    assert list(routers.values()) == [4] and "layers.2." in next(iter(routers))
    with pytest.raises(ValueError, match="num_experts has 1 entries but the model has 3 decoder layers"):
        get_peft_model(native_moe(num_hidden_layers=3, mlp_only_layers=[2]), peft_mole.DynMoLEConfig(num_experts=[4]))
