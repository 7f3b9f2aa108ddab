# Host-side cost of PR2 per microbatch and per MoE layer, next to Megatron's routing replay.
#
# A "model" of L MoE layers (nn.ModuleList, global layer numbers 1..L) with a tiny hidden size,
# so router GEMMs are negligible and what remains is the host work that, on a GPU, runs between
# kernel launches (Python, route decoding, validation): on a GPU this time is exposed whenever
# the host falls behind the device, and before every host sync. Router forwards under no_grad
# (the replay of one microbatch through L routers), CPU time per step:
#   enter      routing(model, "replay", routes).__enter__()
#   first      the first router call of the microbatch (binds: decodes + validates the routes)
#   rest       median of the other router calls
#   exit       the context's __exit__ (checks every route was consumed)
#   megatron   Megatron's RouterReplay per router call (set_target_indices + forward)
#   stock      TopKRouter per router call
# Shapes: router input [T, 1, H] (sequence-major), routes [T, L, k].
#
# Usage: python -m benchmarks.bench_host [--layers 1,8] [--tokens 4096] [--experts 128] [--topk 8]

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `megatron_pr2` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import init_single_process  # noqa: E402


def _model(num_layers: int, spec, config):
    from benchmarks.bench_router import build_layer

    layers = torch.nn.ModuleList()
    for number in range(1, num_layers + 1):
        layer = build_layer(spec, config)
        layer.set_layer_number(number)
        layers.append(layer)
    return layers


def measure(num_layers: int, args: argparse.Namespace) -> dict:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from benchmarks.bench_router import Shape, make_config, moe_spec
    from megatron_pr2 import PR2Config, apply_pr2, routing

    shape = Shape(
        hidden=args.hidden, experts=args.experts, topk=args.topk, tokens=args.tokens, ffn=8
    )
    config = make_config(shape, "cpu", torch.float32, "alltoall", num_layers=num_layers)
    spec = moe_spec(args.experts, "local")
    RouterReplay.clear_global_router_replay_instances()
    stock = _model(num_layers, spec, config)
    megatron = _model(num_layers, spec, dataclasses.replace(config, moe_enable_routing_replay=True))
    RouterReplay.clear_global_router_replay_instances()
    pr2 = _model(num_layers, apply_pr2(spec, PR2Config(telemetry=False)), config)
    for model in (megatron, pr2):
        for layer, ref in zip(model, stock):
            layer.router.weight.data.copy_(ref.router.weight.data)
    x = torch.randn(args.tokens, 1, args.hidden)
    now = time.process_time

    with torch.no_grad():
        indices = []
        for layer in megatron:
            replay = layer.router.router_replay
            replay.set_router_replay_action(RouterReplayAction.RECORD)
            layer.router(x)
            indices.append(replay.get_recorded_indices().clone())
        with routing(pr2, "record") as handle:
            for layer in pr2:
                layer.router(x)
        routes = handle.routes

    def pr2_step():
        with torch.no_grad():
            begin = now()
            context = routing(pr2, "replay", routes)
            context.__enter__()
            entered = now()
            calls = []
            for layer in pr2:
                start = now()
                layer.router(x)
                calls.append(now() - start)
            start = now()
            context.__exit__(None, None, None)
            return entered - begin, calls[0], calls[1:], now() - start

    def megatron_step():
        calls = []
        with torch.no_grad():
            for layer, target in zip(megatron, indices):
                start = now()
                replay = layer.router.router_replay
                replay.clear_indices()
                replay.set_target_indices(target)
                replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
                layer.router(x)
                calls.append(now() - start)
        return calls

    def stock_step():
        calls = []
        with torch.no_grad():
            for layer in stock:
                start = now()
                layer.router(x)
                calls.append(now() - start)
        return calls

    samples = {"enter": [], "first": [], "rest": [], "exit": [], "megatron": [], "stock": []}
    for round_index in range(args.warmup + args.repeats):
        enter, first, rest, leave = pr2_step()
        meg = megatron_step()
        base = stock_step()
        if round_index >= args.warmup:
            samples["enter"].append(enter)
            samples["first"].append(first)
            samples["rest"] += rest
            samples["exit"].append(leave)
            samples["megatron"] += meg
            samples["stock"] += base
    out = {k: statistics.median(v) * 1e3 if v else float("nan") for k, v in samples.items()}
    # Per-microbatch extra host time of PR2 replay over Megatron replay, all L layers.
    pr2_total = out["enter"] + out["first"] + out["exit"]
    if num_layers > 1:
        pr2_total += (num_layers - 1) * out["rest"]
    out["pr2_total"] = pr2_total
    out["megatron_total"] = num_layers * out["megatron"]
    out["extra_per_microbatch"] = pr2_total - out["megatron_total"]
    out["layers"] = num_layers
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PR2 host cost per microbatch and per layer")
    parser.add_argument("--layers", default="1,8", help="comma list of MoE-layer counts")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64, help="tiny: GEMMs stay negligible")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    init_single_process("cpu")
    results = dict(args=vars(args), runs=[])
    print(
        f"router forward (no_grad), CPU ms: T={args.tokens}, E={args.experts}, k={args.topk}, "
        f"H={args.hidden}"
    )
    print(
        f"  {'L':>3s} {'enter':>7s} {'first':>7s} {'rest':>7s} {'exit':>7s} | {'megatron':>8s} "
        f"{'stock':>7s} | {'PR2 total':>9s} {'Megatron total':>14s} {'PR2 extra':>9s}"
    )
    for num_layers in (int(v) for v in args.layers.split(",") if v):
        r = measure(num_layers, args)
        results["runs"].append(r)
        print(
            f"  {num_layers:3d} {r['enter']:7.2f} {r['first']:7.2f} {r['rest']:7.2f} "
            f"{r['exit']:7.2f} | {r['megatron']:8.2f} {r['stock']:7.2f} | {r['pr2_total']:9.2f} "
            f"{r['megatron_total']:14.2f} {r['extra_per_microbatch']:9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
