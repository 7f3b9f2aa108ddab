# Replay with and without the ahead-of-time EP dispatch plan (routing(..., dispatch_plan=True)).
#
# Spawns an expert-parallel gloo world on CPU (EP ranks, optionally x TP with sequence
# parallelism), builds a stack of L PR2 MoE layers (local spec: SequentialMLP, alltoall
# dispatcher) and times, interleaved round-robin (warm-up rounds excluded, start rotated per
# round), one whole routing(model, "replay", routes) context: entry (the plan's one all-to-all)
# plus M microbatches of forward + backward through the stack.
#   off   dispatch_plan=False: the dispatcher all-gathers tokens_per_expert per layer per
#         microbatch (L x M gathers over tp_ep) and, on a GPU, syncs the host on each
#   plan  dispatch_plan=True: one all-to-all at entry, per-layer preprocess is a table lookup
# A barrier closes every timed context, so a round's time is the slowest rank's. Rank 0 prints
# median, IQR [q1, q3] and min-max over rounds, the median of per-round paired ratios plan / off
# and the count exchanges per context (gather_from_sequence_parallel_region calls and the plan's
# int32 all_to_all_single over tp_ep).
#
# On CPU the dispatcher's device->host syncs cost nothing (the counts are host tensors already),
# so the CPU gain is the L x M saved gloo all-gathers (for one all-to-all) and the Python of
# preprocess; on GPUs the plan also removes a host sync per layer per microbatch, which a CPU run
# cannot show.
#
# Shapes: hidden states [S, B, H] (sequence-major; [S / tp, B, H] per rank under sequence
# parallelism); router tokens per rank T_local = S * B / tp; routes [S * B, L, k] per microbatch.
#
# Usage:  python -m benchmarks.bench_dispatch_plan [--ep 2] [--tp 1] [--layers 4]
#         [--microbatches 4] [--seq 128] [--mbs 2] [--hidden 64] [--experts 16] [--topk 4]
#         [--repeats 15] [--warmup 3] [--clock wall|cpu] [--json PATH]

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import queue
import sys
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `megatron_pr2` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    Stats,
    Timer,
    free_port,
    paired_ratio,
    run_interleaved,
)
from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS  # noqa: E402

VARIANTS = ("off", "plan")


def make_config(args: argparse.Namespace):
    """fp32 TransformerConfig of the MoE stack (no aux loss, no dropout, alltoall dispatcher)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=4,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_expert_capacity_factor=args.capacity_factor,
        params_dtype=torch.float32,
        tensor_model_parallel_size=args.tp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.tp,
        sequence_parallel=args.tp > 1,
        **PLAIN_CONFIG_FIELDS,
    )


def build_stack(config) -> torch.nn.ModuleList:
    """config.num_layers PR2 MoE layers, MoE-layer ids 0..L-1."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_pr2 import PR2Config, apply_pr2
    from megatron_pr2.compat import moe_submodules_of

    spec = apply_pr2(
        get_gpt_layer_local_spec(num_experts=config.num_moe_experts), PR2Config(telemetry=False)
    )
    submodules = moe_submodules_of(spec.submodules.mlp)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layers = torch.nn.ModuleList()
    for number in range(1, config.num_layers + 1):
        layer = MoELayer(
            config=config, submodules=submodules, layer_number=number, pg_collection=pg
        )
        layer.set_layer_number(number)
        layers.append(layer.train())
    return layers


def make_routes(args: argparse.Namespace, seed: int) -> list:
    """Skewed random top-k routes (distinct experts per token), recorded drops under capacity."""
    from megatron_pr2 import RouteBatch

    gen = torch.Generator().manual_seed(seed)
    tokens = args.seq * args.mbs
    weights = torch.linspace(1.0, 4.0, args.experts) ** 2
    routes = []
    for _ in range(args.microbatches):
        picks = torch.multinomial(
            weights.expand(tokens * args.layers, args.experts), args.topk, generator=gen
        )
        indices = picks.view(tokens, args.layers, args.topk)
        dropped = None
        if args.capacity_factor is not None:
            dropped = torch.rand(indices.shape, generator=gen) < 0.1
        routes.append(RouteBatch(indices, args.experts, dropped=dropped))
    return routes


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(args.threads)
    try:
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
        )
        results.put((rank, "ok", measure(args)))
    except BaseException as exc:  # noqa: BLE001 - report every rank's failure
        import traceback

        results.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def measure(args: argparse.Namespace) -> Optional[dict]:
    """Inside a rank: build, check the variants agree, time them; rank 0 returns the summary."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import token_dispatcher as dispatcher_module

    from megatron_pr2 import routing
    from megatron_pr2.parallel import layout_for_rank

    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.tp,
    )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    config = make_config(args)
    layers = build_stack(config)
    layout = layout_for_rank(
        args.mbs,
        args.seq,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=args.tp,
        sequence_parallel=args.tp > 1,
    )
    dp_rank = ps.get_data_parallel_rank()
    routes = make_routes(args, args.seed + 1000 * dp_rank)
    gen = torch.Generator().manual_seed(args.seed + dp_rank)
    tokens = args.seq * args.mbs
    rows = layout.token_index
    xs = [torch.randn(tokens, args.hidden, generator=gen)[rows] for _ in range(args.microbatches)]
    gs = [torch.randn(tokens, args.hidden, generator=gen)[rows] for _ in range(args.microbatches)]

    # Count exchanges: the dispatcher's tp_ep all-gathers, wrapped where it looks them up, and
    # the plan's all-to-all of int32 counts over tp_ep (tokens travel as floats).
    tp_ep = layers[0].token_dispatcher.tp_ep_group
    original = dispatcher_module.gather_from_sequence_parallel_region
    original_a2a = torch.distributed.all_to_all_single
    exchanges = {"n": 0}

    def counting(input_, *rest, **kwargs):
        if kwargs.get("group") is tp_ep:
            exchanges["n"] += 1
        return original(input_, *rest, **kwargs)

    def counting_a2a(output, input_, *rest, **kwargs):
        if kwargs.get("group") is tp_ep and input_.dtype == torch.int32:
            exchanges["n"] += 1
        return original_a2a(output, input_, *rest, **kwargs)

    def step(plan: bool) -> List[torch.Tensor]:
        outs = []
        with routing(layers, "replay", routes, layout=layout, dispatch_plan=plan):
            for x, g in zip(xs, gs):
                h = x.view(-1, args.mbs, args.hidden)
                for layer in layers:
                    h, _ = layer(h)
                (h.reshape(-1, args.hidden) * g).sum().backward()
                outs.append(h.detach())
        torch.distributed.barrier()  # the round ends when the slowest rank is done
        return outs

    def zero_grads() -> None:
        for p in layers.parameters():
            p.grad = None
        torch.distributed.barrier()  # untimed: every rank starts the next job together

    counts, outputs = {}, {}
    dispatcher_module.gather_from_sequence_parallel_region = counting
    torch.distributed.all_to_all_single = counting_a2a
    try:
        for variant in VARIANTS:
            exchanges["n"] = 0
            outputs[variant] = step(variant == "plan")
            counts[variant] = exchanges["n"]
            zero_grads()
    finally:
        dispatcher_module.gather_from_sequence_parallel_region = original
        torch.distributed.all_to_all_single = original_a2a
    identical = all(torch.equal(a, b) for a, b in zip(outputs["off"], outputs["plan"]))

    timer = Timer("cpu", clock=args.clock)
    jobs = {variant: (lambda plan=(variant == "plan"): step(plan)) for variant in VARIANTS}
    times = run_interleaved(jobs, timer, args.repeats, args.warmup, between=zero_grads)
    ps.destroy_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    return dict(
        times=times,
        stats={v: Stats.of(times[v]).as_dict() for v in VARIANTS},
        ratio=paired_ratio(times, "plan", "off").as_dict(),
        exchanges=counts,
        identical_outputs=identical,
        local_tokens=int(rows.numel()),
    )


def launch(args: argparse.Namespace) -> dict:
    world = args.ep * args.tp
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    procs = [
        context.Process(target=_rank, args=(r, world, port, args, results), daemon=True)
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    outcomes: Dict[int, tuple] = {}
    try:
        while len(outcomes) < world:
            try:
                rank, status, value = results.get(timeout=args.timeout)
            except queue.Empty:
                raise RuntimeError(f"no rank reported within {args.timeout}s") from None
            outcomes[rank] = (status, value)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return outcomes[0][1]


def report(args: argparse.Namespace, result: dict) -> None:
    print(
        f"replayed MoE stack fwd+bwd per routing() context, CPU gloo, clock={args.clock}: "
        f"EP{args.ep} x TP{args.tp}{' (SP)' if args.tp > 1 else ''}, L={args.layers} MoE layers, "
        f"M={args.microbatches} microbatches, T_local={result['local_tokens']} tokens/rank, "
        f"H={args.hidden}, E={args.experts}, k={args.topk}, capacity={args.capacity_factor}; "
        f"{args.repeats} rounds after {args.warmup} warm-up"
    )
    print(f"{'variant':8} {'median ms':>10} {'q1':>9} {'q3':>9} {'min':>9} {'max':>9} exchanges")
    for variant in VARIANTS:
        s = result["stats"][variant]
        print(
            f"{variant:8} {s['median']:10.2f} {s['q1']:9.2f} {s['q3']:9.2f} {s['min']:9.2f} "
            f"{s['max']:9.2f} {result['exchanges'][variant]:9d}"
        )
    r = result["ratio"]
    print(
        f"plan / off (median of paired per-round ratios): {r['median']:.3f} "
        f"[q1 {r['q1']:.3f}, q3 {r['q3']:.3f}; min {r['min']:.3f}, max {r['max']:.3f}]"
    )
    print(f"outputs identical with and without the plan: {result['identical_outputs']}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="replay with vs without the EP dispatch plan")
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="TP (= expert TP) with sequence par.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    result = launch(args)
    report(args, result)
    if args.json:
        payload = dict(
            args=vars(args),
            torch=torch.__version__,
            machine=platform.platform(),
            **{k: v for k, v in result.items() if k != "times"},
            times=result["times"],
        )
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
