# Inference-engine routes for R3 (replay the rollout engine's routes in the trainer).
#
# One call per engine response returns a canonical RouteBatch ([B * S, L_moe, k], position s of
# sequence b at row b * S + s, or cu_seqlens[b] + s for packed THD input), ready for
# `routing(model, "replay", routes=...)`; the exports produce each engine's own format for round
# trips. EngineLayout, built from the model config, says which of the engine's per-layer columns
# are MoE layers (engines report every transformer layer and fill dense ones with 0).
#   layout.py    EngineLayout.from_hf_config / from_megatron_config
#   adapters.py  routes_from_vllm / routes_from_sglang / routes_from_verl and routes_to_*
#   assemble.py  routes_from_engine / routes_to_engine (generic arrays) and the shared checks
#   wire.py      .npy / flat base64 / array decoding without trusting the payload

from megatron_pr2.engines.adapters import (
    routes_from_sglang,
    routes_from_verl,
    routes_from_vllm,
    routes_to_sglang,
    routes_to_verl,
    routes_to_vllm,
)
from megatron_pr2.engines.assemble import routes_from_engine, routes_to_engine
from megatron_pr2.engines.layout import EngineLayout

__all__ = [
    "EngineLayout",
    "routes_from_engine",
    "routes_from_sglang",
    "routes_from_verl",
    "routes_from_vllm",
    "routes_to_engine",
    "routes_to_sglang",
    "routes_to_verl",
    "routes_to_vllm",
]
