# Tiny Hugging Face transformers MoE models (Qwen3-MoE, DeepSeek-V3, Mixtral) and their weights
# mapped into Megatron-Core GPTModels built with apply_pr2 on the local spec
# (tests/test_hf_parity.py).
#
# Shapes: HF hidden states [B, S, H] (batch-major); Megatron [S, B, H]. HF routers see the
# flattened [B * S] tokens, Megatron routers [S * B]. Megatron's fused QKV weight is grouped per
# query group: [ng * (np / ng + 2) * hn, H] = for each group its q heads, then k, then v. Experts:
# HF gate_up_proj [E, 2I, H] (gate rows first) is Megatron's SwiGLU linear_fc1 [2I, H].
# Rotary embeddings: plain RoPE (rope_type "default" / "rope"); DeepSeek keeps HF's
# rope_interleave=True, which is what Megatron's MLA rope does (de-interleave, rotate_half).
# Build the HF models first; megatron_model() runs inside single_rank() (CPU patches applied).

from typing import Any, Dict, Tuple

import torch

VOCAB, HIDDEN, HEADS = 64, 32, 4


def qwen3_moe_hf(seed: int = 0) -> Any:
    """Qwen3-MoE: 3 layers, layer 0 dense (mlp_only_layers), 8 experts top-2, GQA 4/2 heads."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _init(Qwen3MoeForCausalLM(config), seed)


def mixtral_hf(seed: int = 0) -> Any:
    """Mixtral: 2 layers, all MoE, 8 experts top-2 (softmax, renormalised top-k), GQA 4/2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        sliding_window=None,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _init(MixtralForCausalLM(config), seed)


def deepseek_v3_hf(seed: int = 0) -> Any:
    """DeepSeek-V3: MLA, 3 layers (layer 0 dense), 16 experts in 4 groups (top-2 groups),
    top-4, sigmoid scores + e_score_correction_bias, one shared expert, routed scaling 2.5."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope_interleave=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = _init(DeepseekV3ForCausalLM(config), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers[1:]:  # a bias that changes the choice, as after training
        layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(16, generator=gen))
    return model


@torch.no_grad()
def _init(model: Any, seed: int) -> Any:
    """Random fp32 weights large enough that routing and attention are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.float().eval()


def megatron_config(hf: Any) -> Any:
    """The Megatron TransformerConfig (MLATransformerConfig for DeepSeek) of a tiny HF model."""
    from harness import make_moe_config
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS

    c = hf.config
    deepseek, mixtral = c.model_type == "deepseek_v3", c.model_type == "mixtral"
    layers = range(c.num_hidden_layers)
    if deepseek:
        pattern = [1 if i >= c.first_k_dense_replace else 0 for i in layers]
    else:
        pattern = [0 if i in getattr(c, "mlp_only_layers", ()) else 1 for i in layers]
    fields: Dict[str, Any] = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        moe_ffn_hidden_size=c.intermediate_size if mixtral else c.moe_intermediate_size,
        num_moe_experts=(
            c.num_local_experts if mixtral else (c.n_routed_experts if deepseek else c.num_experts)
        ),
        moe_router_topk=c.num_experts_per_tok,
        moe_layer_freq=pattern,
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        qk_layernorm=not mixtral,
    )
    if not deepseek:
        fields.update(num_query_groups=c.num_key_value_heads, kv_channels=c.head_dim)
        return make_moe_config(**fields)
    fields.update(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=c.n_group,
        moe_router_group_topk=c.topk_group,
        moe_router_topk_scaling_factor=c.routed_scaling_factor,
        moe_shared_expert_intermediate_size=c.moe_intermediate_size * c.n_shared_experts,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_head_dim=c.qk_nope_head_dim,
        qk_pos_emb_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        rope_type="rope",
        rotary_base=c.rope_parameters["rope_theta"],
        rotary_scaling_factor=1.0,
    )
    return MLATransformerConfig(
        **PLAIN_CONFIG_FIELDS,
        params_dtype=torch.float32,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        **fields,
    )


def megatron_model(hf: Any, **pr2_fields: Any) -> Tuple[Any, Any]:
    """A PR2 Megatron GPTModel (local decoder block spec) with the HF model's weights."""
    from harness import build_tiny_gpt
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_pr2 import PR2Config, apply_pr2  # after the CPU patches (0.19 needs them)

    config = megatron_config(hf)
    spec = apply_pr2(
        get_gpt_decoder_block_spec(config, use_transformer_engine=False), PR2Config(**pr2_fields)
    )
    model = build_tiny_gpt(
        config,
        VOCAB,
        hf.config.max_position_embeddings,
        spec=spec,
        position_embedding_type="rope",
        rotary_base=int(hf.config.rope_parameters["rope_theta"]),
    )
    load_hf_weights(model, hf)
    return model.eval(), config


def _qkv(attn: Any, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    q = attn.q_proj.weight.view(groups, heads // groups, head_dim, -1)
    k = attn.k_proj.weight.view(groups, 1, head_dim, -1)
    v = attn.v_proj.weight.view(groups, 1, head_dim, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


@torch.no_grad()
def load_hf_weights(model: Any, hf: Any) -> None:
    """Copy every HF weight into the Megatron model; every Megatron parameter except PR2's
    predictor must receive one (asserted), so a missed tensor cannot pass silently."""
    c, src = hf.config, hf.model
    out: Dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": src.embed_tokens.weight,
        "decoder.final_layernorm.weight": src.norm.weight,
        "output_layer.weight": hf.lm_head.weight,
    }
    for i, layer in enumerate(src.layers):
        p, attn, mlp = f"decoder.layers.{i}.", layer.self_attn, layer.mlp
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "pre_mlp_layernorm.weight"] = layer.post_attention_layernorm.weight
        out[p + "self_attention.linear_proj.weight"] = attn.o_proj.weight
        if c.model_type == "deepseek_v3":
            a = p + "self_attention."
            out[a + "linear_q_down_proj.weight"] = attn.q_a_proj.weight
            out[a + "q_layernorm.weight"] = attn.q_a_layernorm.weight
            out[a + "linear_q_up_proj.weight"] = attn.q_b_proj.weight
            out[a + "linear_kv_down_proj.weight"] = attn.kv_a_proj_with_mqa.weight
            out[a + "kv_layernorm.weight"] = attn.kv_a_layernorm.weight
            out[a + "linear_kv_up_proj.weight"] = attn.kv_b_proj.weight
        else:
            heads, groups = c.num_attention_heads, c.num_key_value_heads
            out[p + "self_attention.linear_qkv.weight"] = _qkv(attn, heads, groups, c.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k
                out[p + "self_attention.q_layernorm.weight"] = attn.q_norm.weight
                out[p + "self_attention.k_layernorm.weight"] = attn.k_norm.weight
        if hasattr(mlp, "experts"):
            out[p + "mlp.router.weight"] = mlp.gate.weight
            for e in range(mlp.experts.gate_up_proj.shape[0]):
                x = f"{p}mlp.experts.local_experts.{e}."
                out[x + "linear_fc1.weight"] = mlp.experts.gate_up_proj[e]
                out[x + "linear_fc2.weight"] = mlp.experts.down_proj[e]
            shared = getattr(mlp, "shared_experts", None)
            if shared is not None:
                fc1 = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
                out[p + "mlp.shared_experts.linear_fc1.weight"] = fc1
                out[p + "mlp.shared_experts.linear_fc2.weight"] = shared.down_proj.weight
        else:
            out[p + "mlp.linear_fc1.weight"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            out[p + "mlp.linear_fc2.weight"] = mlp.down_proj.weight
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in out and not n.endswith("router.predictor.weight")]
    assert not missing and not set(out) - set(params), (missing, set(out) - set(params))
    for name, value in out.items():
        assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
        params[name].copy_(value)
    if c.model_type == "deepseek_v3":
        buffers = dict(model.named_buffers())
        for i, layer in enumerate(src.layers):
            if hasattr(layer.mlp, "experts"):
                buffers[f"decoder.layers.{i}.mlp.router.expert_bias"].copy_(
                    layer.mlp.gate.e_score_correction_bias
                )
