# Parity with an independent implementation: Hugging Face transformers plays the inference
# engine. Tiny random fp32 Qwen3-MoE, DeepSeek-V3 (MLA, sigmoid + e_score_correction_bias,
# group-limited top-k, shared expert, dense first layer) and Mixtral are converted into
# Megatron-Core GPTModels with apply_pr2 (tests/hf_convert.py) and checked:
#   a. live forward: logits within LOGIT_TOL and the per-layer top-k experts identical, token
#      by token (HF router top-k captured with forward hooks);
#   b. R3: the HF routes, written in vLLM's in-process, vLLM HTTP (.npy base64) and SGLang
#      (flat little-endian int32) formats by hand here, imported with megatron_pr2.engines and
#      replayed, select the same experts per (token, layer) and give the same logits;
#   c. with a drifted Megatron router, replay still reproduces the HF routes exactly while live
#      routing ("off") does not.
# Engines never route a sequence's last token, so it has no imported route: the models use
# missing_route_policy="fallback" (that token routes live) and (b)/(c) compare positions < S - 1.
# Shapes: HF routers see [B * S] tokens (batch-major), Megatron routers [S * B]; both are
# compared as [B, S, k] sorted expert ids per MoE layer.

import base64
import io

import numpy as np
import pytest
import torch
from single_rank import single_rank

B, S = 2, 10
PROMPT = 4  # prompt tokens of each sequence (the rest is "generated")
LOGIT_TOL = 1e-5  # max |megatron - hf| / max |hf| of the logits; measured 3e-7 to 7e-7 (fp32)


def hf_forward(hf, ids):
    """HF logits [B, S, V] and sorted top-k [B, S, k] per MoE layer index (hooks on routers)."""
    topk, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "experts"):

            def hook(module, inputs, output, i=i):
                topk[i] = output[2].reshape(B, S, -1).sort(-1).values

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in hooks:
        h.remove()
    return logits, topk


def megatron_forward(model, ids, layers):
    """Megatron logits [B, S, V] and sorted selected experts [B, S, k] per MoE layer index."""
    from megatron_pr2 import pr2_routers

    topk, hooks = {}, []
    for layer, router in zip(layers, pr2_routers(model)):

        def hook(module, inputs, output, layer=layer):
            routing_map = output[1]  # [S * B, E] bool, sequence-major
            chosen = torch.topk(routing_map.float(), module.topk, dim=-1).indices
            topk[layer] = chosen.sort(-1).values.reshape(S, B, -1).transpose(0, 1)

        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(ids, torch.arange(S).expand(B, S), attention_mask=None)
    for h in hooks:
        h.remove()
    return logits, topk


def engine_payloads(hf_topk, layout):
    """The HF routes as each engine sends them: [S - 1, num_hidden_layers, k], dense layers 0."""
    arrays = []
    for b in range(B):
        array = np.zeros((S - 1, layout.num_layers, layout.topk), np.uint8)
        for layer in layout.moe_layers:
            array[:, layer] = hf_topk[layer][b, : S - 1].numpy()
        arrays.append(array)

    def npy_b64(a):
        buffer = io.BytesIO()
        np.save(buffer, a)
        return base64.b64encode(buffer.getvalue()).decode()

    ids = list(range(S))
    vllm_http = {
        "choices": [
            {
                "index": b,
                "routed_experts": npy_b64(a),
                "prompt_token_ids": ids[:PROMPT],
                "token_ids": ids[PROMPT:],
            }
            for b, a in enumerate(arrays)
        ]
    }
    sglang = [
        {
            "meta_info": {
                "prompt_tokens": PROMPT,
                "completion_tokens": S - PROMPT,
                "routed_experts": base64.b64encode(a.astype("<i4").tobytes()).decode(),
            }
        }
        for a in arrays
    ]
    return {"vllm": arrays, "vllm_http": vllm_http, "sglang": sglang}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def drift(model, scale):
    from megatron_pr2 import pr2_routers

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for router in pr2_routers(model):
            router.weight.add_(
                scale * float(router.weight.std()) * torch.randn(router.weight.shape, generator=gen)
            )


DENSE_LAYERS = {"qwen3_moe": (0,), "deepseek_v3": (0,), "mixtral": ()}


@pytest.mark.parametrize("arch", sorted(DENSE_LAYERS))
def test_hf_parity_and_r3_replay(arch) -> None:
    import hf_convert

    hf = getattr(hf_convert, f"{arch}_hf")()
    ids = torch.randint(0, hf_convert.VOCAB, (B, S), generator=torch.Generator().manual_seed(3))
    hf_logits, hf_topk = hf_forward(hf, ids)
    with single_rank():  # CPU patches first: megatron-core 0.19 imports triton otherwise
        from megatron_pr2 import routing
        from megatron_pr2.engines import EngineLayout, routes_from_sglang, routes_from_vllm

        model, config = hf_convert.megatron_model(hf, missing_route_policy="fallback")
        layout = EngineLayout.from_hf_config(hf.config)
        assert layout == EngineLayout.from_megatron_config(config)
        assert layout.dense_layers == DENSE_LAYERS[arch] and sorted(hf_topk) == list(
            layout.moe_layers
        )

        # (a) live forward
        logits, topk = megatron_forward(model, ids, layout.moe_layers)
        print(f"{arch}: logits max relative error {rel_err(logits, hf_logits):.1e}")
        assert rel_err(logits, hf_logits) < LOGIT_TOL
        for layer in layout.moe_layers:
            assert torch.equal(topk[layer], hf_topk[layer]), f"layer {layer}"

        # (b) R3 through each engine format
        payloads = engine_payloads(hf_topk, layout)
        imported = {
            "vllm": routes_from_vllm(payloads["vllm"], layout, S, num_tokens=S),
            "vllm_http": routes_from_vllm(payloads["vllm_http"], layout, S),
            "sglang": routes_from_sglang(payloads["sglang"], layout, S),
        }
        for name, routes in imported.items():
            assert torch.equal(routes.indices, imported["vllm"].indices), name
            with routing(model, "replay", routes=routes):
                logits, topk = megatron_forward(model, ids, layout.moe_layers)
            for layer in layout.moe_layers:
                assert torch.equal(topk[layer], hf_topk[layer]), f"{name} layer {layer}"
            assert rel_err(logits, hf_logits) < LOGIT_TOL, name

        # (c) a drifted policy: replay keeps the engine's routes, live routing moves
        drift(model, scale=1.0)
        _, live = megatron_forward(model, ids, layout.moe_layers)
        moved = sum(
            int((live[layer][:, : S - 1] != hf_topk[layer][:, : S - 1]).any(-1).sum())
            for layer in layout.moe_layers
        )
        assert moved > 0, "the drift should change some live routes"
        with routing(model, "replay", routes=imported["sglang"]):
            _, replayed = megatron_forward(model, ids, layout.moe_layers)
        for layer in layout.moe_layers:
            assert torch.equal(replayed[layer][:, : S - 1], hf_topk[layer][:, : S - 1])
