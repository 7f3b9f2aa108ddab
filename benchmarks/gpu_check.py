# One-GPU check of the paths a CPU run cannot exercise (issue 13, item 8): NCCL, CUDA uploads,
# the Transformer Engine spec and the dispatch plan's host-sync removal. Run by
# scripts/gpu_check.sh (under a 5-minute limit); writes one JSON and exits non-zero on failure.
#
#   nccl        a single-GPU NCCL world: routing() record -> replay of a 4-layer MoE stack (alltoall
#               dispatcher, bf16, 8 microbatches, MoE recompute) replays every (token, layer)
#               exactly; the replay forward+backward runs under torch.cuda.set_sync_debug_mode
#               ("warn") and the synchronising calls made from megatron_pr2 are counted (target 0);
#               the residency's peak device bytes stay at two microbatches
#   plan        the same stack with dispatch_plan=True vs False: host time to enqueue the
#               forward of every microbatch and device time (torch.cuda events), and the number
#               of synchronising calls each makes (the stock preprocess copies counts to the host
#               and waits, once per layer per microbatch; the plan does not)
#   te          with Transformer Engine installed: the TE layer spec (TEGroupedMLP experts) with
#               apply_pr2, record -> replay bit-identical to Megatron's RouterReplay, and
#               moe_router_fusion=True (TE's fused top-k in 'off', unfused in PR2 modes)
#   router      benchmarks.bench_router on CUDA (large shapes, few repeats): paired ratios and
#               op counts
# Without CUDA it stops at once with exit status 2 and says so.
#
# Usage: python -m benchmarks.gpu_check [--json PATH] [--skip router,te]

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PACKAGE = None  # megatron_pr2's directory, set in main()


def _layers(num_layers: int, recompute: bool, spec: str = "local", **overrides):
    from benchmarks.bench_router import Shape, build_layer, make_config, moe_spec
    from megatron_pr2 import PR2Config, apply_pr2

    shape = Shape(hidden=1024, experts=64, topk=8, tokens=4096, ffn=512)
    if recompute:
        overrides.update(recompute_granularity="selective", recompute_modules=["moe"])
    config = make_config(shape, "cuda", torch.bfloat16, "alltoall", **overrides)
    layers = torch.nn.ModuleList()
    for number in range(1, num_layers + 1):
        pr2 = apply_pr2(moe_spec(shape.experts, spec), PR2Config(cache_tokens_per_sequence=512))
        layer = build_layer(pr2, config)
        layer.set_layer_number(number)
        layers.append(layer)
    return layers, shape


def _forward(layers, x):
    for layer in layers:
        x, _ = layer(x)
    return x


def _sync_warnings(run: Callable[[], None]) -> List[str]:
    """Synchronising CUDA calls made from megatron_pr2 frames while `run` runs."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = []
    for w in caught:
        if "synchroniz" not in str(w.message).lower():
            continue
        if os.path.abspath(w.filename).startswith(_PACKAGE):
            out.append(f"{os.path.relpath(w.filename, _PACKAGE)}:{w.lineno}")
    return out


def check_nccl() -> Dict:
    from megatron_pr2 import routing

    layers, shape = _layers(4, recompute=True)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape.tokens, 1, shape.hidden, generator=gen) for _ in range(8)]
    xs = [x.cuda().bfloat16() for x in xs]
    maps: Dict[int, List[torch.Tensor]] = {}
    for layer in layers:
        layer.router.register_forward_hook(
            lambda m, i, o: maps.setdefault(m.moe_layer_id, []).append(o[1].detach().clone())
        )
    with torch.no_grad(), routing(layers, "predict_record") as handle:
        for x in xs:
            _forward(layers, x)
    routes = handle.routes_per_microbatch
    recorded = {k: list(v) for k, v in maps.items()}
    maps.clear()
    for layer in layers:  # drift: replay must not re-route
        with torch.no_grad():
            layer.router.weight.add_(torch.randn_like(layer.router.weight) * 0.5)
    session_stats = {}

    def replay():
        with routing(layers, "replay", routes, ministep=2) as ctx:
            outs = [_forward(layers, x.clone().requires_grad_(True)) for x in xs]
            for out in outs:
                out.float().sum().backward()
            session_stats.update(vars(layers[0].router.session.residency.stats))
        assert ctx.metrics["predictor_loss"].isfinite().all()

    syncs = _sync_warnings(replay)
    exact = all(torch.equal(maps[k][m], recorded[k][m]) for k in recorded for m in range(len(xs)))
    return dict(
        backend=str(torch.distributed.get_backend()),
        replay_exact=exact,
        pr2_sync_calls=syncs,
        residency=session_stats,
        ok=exact and not syncs and session_stats.get("peak_microbatches", 99) <= 2,
    )


def check_plan(repeats: int = 5) -> Dict:
    from megatron_pr2 import RouteBatch, routing

    layers, shape = _layers(8, recompute=False)
    gen = torch.Generator().manual_seed(1)
    num_mb = 8
    xs = [torch.randn(shape.tokens, 1, shape.hidden, generator=gen).cuda().bfloat16()]
    xs = xs * num_mb
    picks = torch.rand(num_mb, shape.tokens, len(layers), shape.experts, generator=gen)
    routes = [RouteBatch(p.topk(shape.topk, dim=-1).indices, shape.experts) for p in picks]
    out = {}
    for plan in (False, True):
        host, device = [], []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad(), routing(layers, "replay", routes, dispatch_plan=plan):
                t0 = time.perf_counter()
                start.record()
                for x in xs:
                    _forward(layers, x)
                end.record()
                host.append(1e3 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            device.append(start.elapsed_time(end))

        def run():
            with torch.no_grad(), routing(layers, "replay", routes, dispatch_plan=plan):
                for x in xs:
                    _forward(layers, x)

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        out["plan" if plan else "stock"] = dict(
            host_enqueue_ms=sorted(host[1:])[len(host[1:]) // 2],
            device_ms=sorted(device[1:])[len(device[1:]) // 2],
            sync_calls=syncs,
        )
    out["ok"] = out["plan"]["sync_calls"] < out["stock"]["sync_calls"]
    return out


def check_te() -> Dict:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return dict(skipped="transformer_engine is not installed", ok=True)
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_pr2 import routing

    layers, shape = _layers(1, recompute=False, spec="te")
    replay_layers, _ = _layers(1, recompute=False, spec="te", moe_enable_routing_replay=True)
    replay_layers.load_state_dict(layers.state_dict(), strict=False)
    x = torch.randn(shape.tokens, 1, shape.hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), routing(layers, "record") as handle:
        layers[0](x)
    megatron = replay_layers[0].router.router_replay
    megatron.set_router_replay_action(RouterReplayAction.RECORD)
    with torch.no_grad():
        replay_layers[0](x)
    indices = megatron.get_recorded_indices().clone()
    for model in (layers, replay_layers):
        with torch.no_grad():
            model[0].router.weight.add_(0.5 * torch.randn_like(model[0].router.weight))
    replay_layers[0].router.weight.data.copy_(layers[0].router.weight.data)
    megatron.set_target_indices(indices)
    megatron.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    reference = replay_layers[0](x)[0]
    megatron.clear_router_replay_action()
    RouterReplay.clear_global_router_replay_instances()
    with routing(layers, "replay", handle.routes):
        ours = layers[0](x)[0]
    fused, _ = _layers(1, recompute=False, spec="te", moe_router_fusion=True)
    fused.load_state_dict(layers.state_dict())
    with torch.no_grad():
        off = fused[0](x)[0]  # TE's fused top-k
        with routing(fused, "replay", handle.routes):
            fused_replay = fused[0](x)[0]
    return dict(
        te_replay_equals_megatron=bool(torch.equal(ours, reference)),
        fused_replay_equals_unfused=bool(torch.equal(fused_replay, ours.detach())),
        fused_off_ran=bool(off.isfinite().all()),
        ok=bool(torch.equal(ours, reference)) and bool(torch.equal(fused_replay, ours.detach())),
    )


def check_router() -> Dict:
    from benchmarks import bench_router

    result = bench_router.main(
        [
            "--device",
            "cuda",
            "--shapes",
            "large",
            "--repeats",
            "10",
            "--router-repeats",
            "30",
            "--warmup",
            "3",
            "--parts",
            "router,router_fwd",
            "--variants",
            "stock,megatron_replay,pr2_predict_record,pr2_replay,pr2_replay_ploss",
        ]
    )
    ratios = {
        name: {part: entry["parts"][part]["ratios"] for part in entry["parts"]}
        for name, entry in result["shapes"].items()
    }
    return dict(
        ratios=ratios, op_counts={n: e.get("op_counts") for n, e in result["shapes"].items()}
    )


CHECKS = dict(nccl=check_nccl, plan=check_plan, te=check_te, router=check_router)


def main(argv=None) -> int:
    global _PACKAGE
    parser = argparse.ArgumentParser(description="one-GPU check of megatron-pr2")
    parser.add_argument("--json", default="gpu_check.json")
    parser.add_argument("--skip", default="", help=f"comma list of {list(CHECKS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was run.")
        return 2
    from benchmarks.common import init_single_process

    init_single_process("cuda")  # one-rank NCCL world + Megatron parallel state
    import megatron_pr2

    _PACKAGE = os.path.dirname(os.path.abspath(megatron_pr2.__file__))
    skip = {s for s in args.skip.split(",") if s}
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    failed = False
    for name, check in CHECKS.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = check()
        except Exception:  # report every check, then fail
            report[name] = dict(ok=False, error=traceback.format_exc(limit=8))
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        failed |= report[name].get("ok") is False
        print(f"[gpu_check] {name}: {json.dumps(report[name], default=str)[:2000]}", flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"[gpu_check] wrote {args.json}; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
