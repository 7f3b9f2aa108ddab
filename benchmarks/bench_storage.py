# Route storage and transport sizes of PR2, measured on the real code path and then projected.
#
# 1. Bytes per (token, MoE layer) of a RouteBatch (bit-packed, ceil(log2 E) bits per expert id)
#    versus int64 (what Megatron's RouterReplay keeps: torch.topk indices), int32 and uint8.
#    Measured: RouteBatch(...).nbytes on real routes (recorded by a real MoE layer, and random
#    distinct top-k ids at the target E and k), divided by tokens x layers.
# 2. Per-rank route bytes for two production layouts, per microbatch (measured: the canonical
#    RouteBatch of one microbatch is built and sliced with megatron_pr2.sharding.shard_routes for
#    one rank; .nbytes of the slice) and per RL step (projected with --tokens-per-step):
#      sharded     each rank holds its SP/CP token shard x its pipeline stage's MoE layers
#      dp-bcast    each rank holds its data-parallel shard, all tokens and all MoE layers
#                  (routes travelling with the data batch: TP and PP peers hold copies)
#      bcast       every rank holds the whole step's routes
# 3. Predictor-cache bytes per token, C/S x L x (H + E) x 4 bytes (+ 8 C/S for token ids),
#    measured on a real predict_record pass of a small layer (PredictorCache.nbytes) and printed
#    next to activation memory per token: Megatron's estimate for one transformer layer,
#    s*b*h*(34 + 5*a*s/h) bytes (Korthikanti et al. 2022, 16-bit activations, no recompute,
#    no SP), i.e. 34*h + 5*a*s bytes per token per layer; with flash attention (no s x s
#    scores stored) 34*h. A clearly stated reference point, not a measurement.
#
# Shapes: indices [T, L, k] (T tokens, L MoE layers, k top-k), E experts, H hidden, a heads,
# S sequence length, C cached tokens per sequence.
#
# Usage: python -m benchmarks.bench_storage [--tokens-per-step N] [--seq-length S] [--json PATH]

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `megatron_pr2` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pr2.routes import RouteBatch, bits_for  # noqa: E402


@dataclass(frozen=True)
class ModelLayout:
    """A production-like MoE model and parallel layout."""

    name: str
    num_layers: int
    """Transformer layers."""
    first_dense: int
    """Leading dense (non-MoE) layers (DeepSeek-V3: 3)."""
    hidden: int
    heads: int
    experts: int
    topk: int
    pp: int
    tp: int
    ep: int
    world: int
    """GPUs; data-parallel size = world / (pp * tp * cp)."""
    cp: int = 1
    sequence_parallel: bool = True
    pp_first_layers: Optional[int] = None
    """Layers of the first pipeline stage when the split is uneven (Megatron's
    decoder_first_pipeline_num_layers)."""
    pp_last_layers: Optional[int] = None
    """Layers of the last pipeline stage (decoder_last_pipeline_num_layers)."""

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense

    @property
    def dp(self) -> int:
        return self.world // (self.pp * self.tp * self.cp)


LAYOUTS = (
    # Qwen3-30B-A3B: 48 layers, all MoE, hidden 2048, 32 query heads, 128 experts, top-8.
    ModelLayout(
        "Qwen3-30B-A3B-like",
        num_layers=48,
        first_dense=0,
        hidden=2048,
        heads=32,
        experts=128,
        topk=8,
        pp=4,
        tp=2,
        ep=8,
        world=64,
    ),
    # DeepSeek-V3 (671B): 61 layers, 3 dense + 58 MoE, hidden 7168, 128 heads, 256 routed
    # experts, top-8; PP16 with an uneven split 4 + 14 x 4 + 1 (Megatron's recipe style).
    ModelLayout(
        "DeepSeek-V3-like",
        num_layers=61,
        first_dense=3,
        hidden=7168,
        heads=128,
        experts=256,
        topk=8,
        pp=16,
        tp=1,
        ep=64,
        world=1024,
        sequence_parallel=False,
        pp_first_layers=4,
        pp_last_layers=1,
    ),
)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


def random_routes(tokens: int, layers: int, topk: int, experts: int, seed: int) -> torch.Tensor:
    """[T, L, k] distinct expert ids per (token, layer), as a router's top-k produces."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens * layers, experts, generator=generator)
    return scores.topk(topk, dim=1).indices.view(tokens, layers, topk)


def bytes_per_token_layer(experts: int, topk: int, tokens: int = 4096, layers: int = 4) -> dict:
    """Measured RouteBatch bytes per (token, layer) next to plain integer formats."""
    indices = random_routes(tokens, layers, topk, experts, seed=experts * 31 + topk)
    batch = RouteBatch(indices, experts)
    assert torch.equal(batch.indices, indices), "RouteBatch round trip changed the routes"
    n = tokens * layers
    return dict(
        experts=experts,
        topk=topk,
        bits=bits_for(experts),
        routebatch=batch.nbytes / n,
        int64=8.0 * topk,
        int32=4.0 * topk,
        uint8=1.0 * topk if experts <= 256 else float("nan"),
    )


def real_record_check(device: str = "cpu") -> dict:
    """Record routes and a predictor cache with a real MoE layer; check the byte formulas.

    Builds a small Megatron-Core MoELayer (hidden 64, 8 experts, top-2) with PR2's router,
    runs routing(..., "predict_record") and compares RouteBatch.nbytes / PredictorCache.nbytes
    with ceil(T*L*k*bits/8) and C*8 + C*L*(H+E)*4.
    """
    from benchmarks.common import init_single_process

    # First: on CPU the patches must precede any megatron-core import (0.19 without triton).
    init_single_process(device)
    from benchmarks.bench_router import Shape, build_layer, make_config, moe_spec
    from megatron_pr2 import PR2Config, apply_pr2, routing

    shape = Shape(hidden=64, experts=8, topk=2, tokens=512, ffn=64, micro_batch=2)
    config = make_config(shape, device, torch.float32, "alltoall")
    cache_tokens = shape.seq_length // 8
    layer = build_layer(
        apply_pr2(
            moe_spec(shape.experts, "local"), PR2Config(cache_tokens_per_sequence=cache_tokens)
        ),
        config,
    )
    x = torch.randn(shape.seq_length, shape.micro_batch, shape.hidden)
    with torch.no_grad(), routing(layer, "predict_record") as handle:
        layer(x)
    routes = handle.routes
    T, L, k = routes.shape
    expected_routes = math.ceil(T * L * k * bits_for(shape.experts) / 8)
    C = routes.cache.token_index.numel()
    expected_cache = C * 8 + C * L * (shape.hidden + shape.experts) * 4
    return dict(
        tokens=T,
        layers=L,
        topk=k,
        experts=shape.experts,
        routebatch_nbytes=routes.nbytes,
        routebatch_formula=expected_routes,
        cached_tokens=C,
        cache_nbytes=routes.cache.nbytes,
        cache_formula=expected_cache,
        ok=routes.nbytes == expected_routes and routes.cache.nbytes == expected_cache,
    )


def _config_for(layout: ModelLayout):
    """A TransformerConfig of the layout (no weights are built) for parallel.moe_layer_ids."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    freq = [0] * layout.first_dense + [1] * layout.moe_layers
    return TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden,
        num_attention_heads=layout.heads,
        num_moe_experts=layout.experts,
        moe_router_topk=layout.topk,
        moe_layer_freq=freq,
        pipeline_model_parallel_size=layout.pp,
        tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        num_layers_in_first_pipeline_stage=layout.pp_first_layers,
        num_layers_in_last_pipeline_stage=layout.pp_last_layers,
        pipeline_dtype=torch.bfloat16,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
    )


def stage_layers(layout: ModelLayout) -> List[torch.Tensor]:
    """Global MoE-layer ids of every pipeline stage (megatron_pr2.parallel.moe_layer_ids)."""
    from megatron_pr2.parallel import moe_layer_ids

    config = _config_for(layout)
    return [moe_layer_ids(config, rank, layout.pp) for rank in range(layout.pp)]


def per_rank_bytes(
    layout: ModelLayout, seq_length: int, micro_batch: int, tokens_per_step: int
) -> dict:
    """Measured bytes of one rank's route shard per microbatch, and per-step projections."""
    from megatron_pr2.parallel import layout_for_rank, shard_routes

    stages = stage_layers(layout)
    assert sum(s.numel() for s in stages) == layout.moe_layers, "stages miss MoE layers"
    tokens = seq_length * micro_batch
    canonical = RouteBatch(
        random_routes(tokens, layout.moe_layers, layout.topk, layout.experts, seed=7),
        layout.experts,
        seq_length=seq_length,
    )
    # The busiest rank: the stage with the most MoE layers, TP rank 0, CP rank 0.
    busiest = max(range(layout.pp), key=lambda r: stages[r].numel())
    token_layout = layout_for_rank(
        micro_batch,
        seq_length,
        tp_rank=0,
        tp_size=layout.tp,
        sequence_parallel=layout.sequence_parallel,
        cp_rank=0,
        cp_size=layout.cp,
    )
    shard = shard_routes(canonical, token_layout, stages[busiest])
    # Sharded RouteBatches also keep token_index/layer_index (int64 per row, in memory only;
    # sharding's wire format run-length encodes them to a few ints).
    microbatches_per_rank = tokens_per_step / (layout.dp * tokens)
    step = dict(
        sharded=shard.nbytes * microbatches_per_rank,
        dp_bcast=canonical.nbytes * microbatches_per_rank,
        bcast=canonical.nbytes * tokens_per_step / tokens,
    )
    # torch.topk indices are int64: Megatron's RouterReplay holds this for the same shard.
    int64_shard = token_layout.token_index.numel() * stages[busiest].numel() * layout.topk * 8
    return dict(
        layout=asdict(layout),
        dp=layout.dp,
        moe_layers_per_stage=[int(s.numel()) for s in stages],
        microbatch_tokens=tokens,
        rank_tokens_per_microbatch=int(token_layout.token_index.numel()),
        rank_moe_layers=int(stages[busiest].numel()),
        microbatches_per_rank_per_step=microbatches_per_rank,
        microbatch_bytes=dict(
            sharded=shard.nbytes,
            dp_bcast=canonical.nbytes,
            int64_shard=int64_shard,
        ),
        step_bytes_per_rank=step,
        step_bytes_cluster=dict(
            sharded=step["sharded"] * layout.world,
            dp_bcast=step["dp_bcast"] * layout.world,
            bcast=step["bcast"] * layout.world,
        ),
    )


def cache_vs_activation(
    layout: ModelLayout, seq_length: int, cache_fraction: int, tokens_per_step: int
) -> dict:
    """Predictor-cache bytes per token next to activation bytes per token."""
    H, E, L, a, S = layout.hidden, layout.experts, layout.moe_layers, layout.heads, seq_length
    per_token_layer = (H + E) * 4 / cache_fraction
    per_token_model = per_token_layer * L + 8 / cache_fraction
    act_layer = 34 * H + 5 * a * S
    act_layer_flash = 34 * H
    stages = stage_layers(layout)
    rank_layers = max(int(s.numel()) for s in stages)
    sp = layout.tp if layout.sequence_parallel else 1
    rank_tokens_step = tokens_per_step / layout.dp / sp / layout.cp
    return dict(
        cache_fraction=f"1/{cache_fraction}",
        cache_bytes_per_token_per_layer=per_token_layer,
        cache_bytes_per_token_model=per_token_model,
        activation_bytes_per_token_per_layer=act_layer,
        activation_bytes_per_token_per_layer_flash=act_layer_flash,
        activation_bytes_per_token_model=act_layer * layout.num_layers,
        cache_over_activation_per_layer=per_token_layer / act_layer,
        cache_over_activation_per_layer_flash=per_token_layer / act_layer_flash,
        rank_cache_bytes_per_step=rank_tokens_step
        * (per_token_layer * rank_layers + 8 / cache_fraction),
        rank_cache_bytes_per_step_bf16=rank_tokens_step
        * (per_token_layer / 2 * rank_layers + 8 / cache_fraction),
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PR2 route storage / transport sizes")
    parser.add_argument(
        "--tokens-per-step",
        type=int,
        default=2**24,
        help="tokens of one RL step (rollout batch) on the whole cluster; default 16.8M, e.g. "
        "512 prompts x 16 samples x 2K tokens",
    )
    parser.add_argument("--seq-length", type=int, default=4096, help="S of one microbatch")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument(
        "--cache-fraction", type=int, default=8, help="cache S/N tokens per sequence (paper: 8)"
    )
    parser.add_argument("--skip-real", action="store_true", help="skip the real-layer check")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    results: Dict[str, object] = dict(args=vars(args))

    if args.skip_real:
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()  # a no-op with CUDA; lets megatron-core 0.19 import without triton
    else:
        check = real_record_check()
        results["real_record_check"] = check
        print(
            f"real predict_record pass (MoELayer h64, E8, top-2, T={check['tokens']}): "
            f"RouteBatch.nbytes={check['routebatch_nbytes']} (formula "
            f"{check['routebatch_formula']}), PredictorCache.nbytes={check['cache_nbytes']} "
            f"(formula {check['cache_formula']}): {'OK' if check['ok'] else 'MISMATCH'}"
        )

    print("\n1. Route bytes per token per MoE layer (RouteBatch measured on random top-k ids)")
    print(
        f"  {'experts':>7s} {'top-k':>5s} {'bits':>4s} {'RouteBatch':>10s} {'int64':>6s} "
        f"{'int32':>6s} {'uint8':>6s} {'int32/RB':>8s}"
    )
    rows = []
    for experts, topk in ((8, 2), (32, 4), (64, 8), (128, 8), (256, 8), (512, 8)):
        row = bytes_per_token_layer(experts, topk)
        rows.append(row)
        print(
            f"  {experts:7d} {topk:5d} {row['bits']:4d} {row['routebatch']:10.3f} "
            f"{row['int64']:6.0f} {row['int32']:6.0f} {row['uint8']:6.0f} "
            f"{row['int32'] / row['routebatch']:8.2f}"
        )
    results["bytes_per_token_layer"] = rows

    print(
        f"\n2. Per-rank route bytes (microbatch S={args.seq_length} x B={args.micro_batch}; "
        f"{args.tokens_per_step:,} tokens per RL step)"
    )
    results["layouts"] = []
    for layout in LAYOUTS:
        r = per_rank_bytes(layout, args.seq_length, args.micro_batch, args.tokens_per_step)
        c = cache_vs_activation(layout, args.seq_length, args.cache_fraction, args.tokens_per_step)
        results["layouts"].append(dict(routes=r, cache=c))
        lay = r["layout"]
        print(
            f"\n  {layout.name}: {layout.moe_layers} MoE layers, {layout.experts} experts, "
            f"top-{layout.topk}, hidden {layout.hidden}; PP{lay['pp']} x TP{lay['tp']}"
            f"{' SP' if layout.sequence_parallel and layout.tp > 1 else ''} x EP{lay['ep']}, "
            f"{lay['world']} GPUs, DP {r['dp']}; MoE layers per stage {r['moe_layers_per_stage']}"
        )
        mb, st, cl = r["microbatch_bytes"], r["step_bytes_per_rank"], r["step_bytes_cluster"]
        print(
            f"    per microbatch, busiest rank ({r['rank_tokens_per_microbatch']} tokens x "
            f"{r['rank_moe_layers']} layers): sharded {human(mb['sharded'])}, dp-bcast "
            f"{human(mb['dp_bcast'])}; same shard as int64 (torch.topk / Megatron RouterReplay) "
            f"{human(mb['int64_shard'])}"
        )
        print(
            f"    per step per rank ({r['microbatches_per_rank_per_step']:.0f} microbatches): "
            f"sharded {human(st['sharded'])}, dp-bcast {human(st['dp_bcast'])}, bcast "
            f"{human(st['bcast'])}"
        )
        print(
            f"    per step, whole cluster: sharded {human(cl['sharded'])}, dp-bcast "
            f"{human(cl['dp_bcast'])}, bcast {human(cl['bcast'])}"
        )
        print(
            f"    predictor cache ({c['cache_fraction']} of tokens, fp32 h_old and p_old): "
            f"{c['cache_bytes_per_token_per_layer']:.0f} B per token per layer "
            f"({c['cache_bytes_per_token_model'] / 1024:.1f} KiB per token, all MoE layers) vs "
            f"activations {c['activation_bytes_per_token_per_layer'] / 1024:.1f} KiB per token "
            f"per layer (34h+5as; 34h = {c['activation_bytes_per_token_per_layer_flash'] / 1024:.1f}"
            f" KiB): {100 * c['cache_over_activation_per_layer']:.2f}% "
            f"({100 * c['cache_over_activation_per_layer_flash']:.2f}% of 34h)"
        )
        print(
            f"    predictor cache held per rank for one step (its tokens x its stage's layers): "
            f"{human(c['rank_cache_bytes_per_step'])} fp32, "
            f"{human(c['rank_cache_bytes_per_step_bf16'])} if stored in bf16"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
