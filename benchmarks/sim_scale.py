# Scale simulator: ONE rank of a 256-1024-rank world, on CPU, through the real PR2 code paths.
#
# Each layout runs in its own process with torch.distributed's "fake" backend (FakeStore: every
# collective returns at once without moving data) and Megatron-Core's parallel state for the
# whole world, so the process groups, the dispatch plan's all-to-all and the routers' groups have
# their real sizes. Simulated for the rank at pipeline stage 0 (the stage that holds the most
# microbatches in flight under 1F1B):
#   sharding    shard_routes of one canonical microbatch (T tokens x every MoE layer x k) to
#               this rank's router rows and stage layers (the predictor cache is attached to the
#               shard: [C_local, L_stage, H] / [.., E] in PR2Config.cache_dtype, zeros)
#   replay      routing(model, "replay", M shards): the entry (decode + dispatch plan), then a
#               1F1B schedule of router calls (session.ask) and dispatcher preprocess calls (the
#               plan's hook); the routers' GEMMs and the experts are not run (stock cost)
#   record      routing(model, "predict_record") for 2 x PP microbatches through session.ask /
#               save with real top-k indices and shape-only (meta) cache tensors, then packing
# Memory is device-equivalent bytes (what a GPU would hold; CPU views are counted as copies):
# routes and caches resident on the device (residency.py's accounting), the dispatch-plan
# tables, and what autograd keeps for the predictor's backward per layer of each microbatch in
# flight (its input h_old as stored, and two [C_local, E] fp32 log-probabilities of the loss; a
# model of the saved tensors, from the real shapes). The physical minimum is the routes (narrow
# dtype) and cache (cache_dtype) of the microbatches 1F1B holds at once at stage 0 (PP).
#
# Baseline side by side: --baseline DIR runs the same entry (and binds 2 x PP microbatches, its
# per-microbatch host cost) with the megatron_pr2 package of another checkout, e.g. d1de9d6:
#     git worktree add --detach ../pr2-d1de9d6 d1de9d6
#     python -m benchmarks.sim_scale --baseline ../pr2-d1de9d6
# (the child process puts DIR first on sys.path; only APIs both versions have are used).
#
# Usage: python -m benchmarks.sim_scale [--layouts a,b] [--microbatches 512] [--seq 16384]
#        [--cache-tokens 2048] [--cache-dtype bf16] [--baseline DIR] [--entry-repeats 1]
#        [--json PATH]

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # hidden, routed experts, top-k, MoE layers (DeepSeek-V3: 58 of 61 layers are MoE)
    "dsv3": dict(hidden=7168, experts=256, topk=8, moe_layers=58),
    "qwen3-235b-a22b": dict(hidden=4096, experts=128, topk=8, moe_layers=94),
    "qwen3-30b-a3b": dict(hidden=2048, experts=128, topk=8, moe_layers=48),
}
# world = tp x cp x dp x pp; expert parallelism is carved out of tp x cp x dp (ETP 1).
LAYOUTS = {
    "dsv3-tp1-pp8-ep64": dict(model="dsv3", tp=1, pp=8, ep=64, cp=1, dp=64),
    "dsv3-tp2-pp16-ep32-cp2": dict(model="dsv3", tp=2, pp=16, ep=32, cp=2, dp=8),
    "dsv3-tp1-pp16-ep64": dict(model="dsv3", tp=1, pp=16, ep=64, cp=1, dp=64),
    "qwen3-235b-tp4-pp8-ep16": dict(model="qwen3-235b-a22b", tp=4, pp=8, ep=16, cp=1, dp=16),
    "qwen3-30b-tp2-pp4-ep8": dict(model="qwen3-30b-a3b", tp=2, pp=4, ep=8, cp=1, dp=32),
}
BAR_LAYOUT = "dsv3-tp1-pp8-ep64"


def _cpu_seconds() -> float:
    return time.process_time()


def _mib(n: float) -> float:
    return n / 2**20


# -------------------------------------------------------------------------------------------------
# child: one layout, one package version
# -------------------------------------------------------------------------------------------------
def _setup(spec: dict, model: dict, args) -> dict:
    """Fake world, Megatron parallel state, this rank's stage of PR2 MoE layers."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    world = spec["tp"] * spec["cp"] * spec["dp"] * spec["pp"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    import inspect

    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_pr2 import PR2Config, apply_pr2

    extra = {}
    if (
        "create_gloo_process_groups"
        in inspect.signature(parallel_state.initialize_model_parallel).parameters
    ):
        extra["create_gloo_process_groups"] = False
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=spec["tp"],
        pipeline_model_parallel_size=spec["pp"],
        context_parallel_size=spec["cp"],
        expert_model_parallel_size=spec["ep"],
        expert_tensor_parallel_size=1,
        **extra,
    )
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    stage_layers = -(-model["moe_layers"] // spec["pp"])
    config = TransformerConfig(
        num_layers=stage_layers * spec["pp"],
        hidden_size=model["hidden"],
        ffn_hidden_size=8,
        num_attention_heads=max(spec["tp"], model["hidden"] // 128),
        num_moe_experts=model["experts"],
        moe_router_topk=model["topk"],
        moe_ffn_hidden_size=8,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        tensor_model_parallel_size=spec["tp"],
        pipeline_model_parallel_size=spec["pp"],
        context_parallel_size=spec["cp"],
        expert_model_parallel_size=spec["ep"],
        expert_tensor_parallel_size=1,
        sequence_parallel=spec["tp"] > 1,
        gated_linear_unit=True,
        activation_func=F.silu,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        # megatron_pr2.cpu.PLAIN_CONFIG_FIELDS, spelled out: a --baseline package may lack it.
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    pr2_kwargs = dict(cache_tokens_per_sequence=args.cache_tokens, telemetry=False)
    if args.cache_dtype != "fp32":
        pr2_kwargs["cache_dtype"] = args.cache_dtype  # (a field the baseline may not have)
    mlp = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=model["experts"]).submodules.mlp
    spec_pr2 = apply_pr2(mlp, PR2Config(**pr2_kwargs))
    pg = ProcessGroupCollection.use_mpu_process_groups()
    layers = torch.nn.ModuleList()
    for number in range(1, stage_layers + 1):  # pipeline stage 0: layers 1..L_stage
        if callable(spec_pr2) and not hasattr(spec_pr2, "module"):
            layer = spec_pr2(config=config, layer_number=number, pg_collection=pg)
        else:
            layer = build_module(spec_pr2, config=config, layer_number=number, pg_collection=pg)
        layer.set_layer_number(number)
        layers.append(layer)
    return dict(config=config, layers=layers, world=world, stage_layers=stage_layers)


def _routes(spec: dict, model: dict, env: dict, args) -> dict:
    """One canonical microbatch sharded to this rank (timed), the cache attached, M copies."""
    import torch

    from megatron_pr2 import RouteBatch
    from megatron_pr2.parallel import layout_for_rank, shard_routes
    from megatron_pr2.routes import PredictorCache

    T, L, k, E = args.seq, model["moe_layers"], model["topk"], model["experts"]
    gen = torch.Generator().manual_seed(1)
    # Distinct experts per (token, layer): a random start and an odd stride mod E (E = 2^n).
    start = torch.randint(0, E, (T, L, 1), generator=gen)
    stride = 2 * torch.randint(0, E // 2, (T, L, 1), generator=gen) + 1
    canonical = RouteBatch((start + stride * torch.arange(k)) % E, E, seq_length=T)
    layout = layout_for_rank(
        1,
        T,
        tp_rank=0,
        tp_size=spec["tp"],
        sequence_parallel=spec["tp"] > 1,
        cp_rank=0,
        cp_size=spec["cp"],
    )
    layer_ids = list(range(env["stage_layers"]))
    t0 = _cpu_seconds()
    shard = shard_routes(canonical, layout, layer_ids)
    shard_s = _cpu_seconds() - t0
    stride_c = max(1, T // args.cache_tokens)
    cached = torch.nonzero(layout.token_index % stride_c == 0).squeeze(1)
    dtype = torch.bfloat16 if args.cache_dtype == "bf16" else torch.float32
    c_local = int(cached.numel())
    shard.cache = PredictorCache(
        token_index=layout.token_index[cached],
        hidden=torch.zeros(c_local, len(layer_ids), model["hidden"], dtype=dtype),
        logits=torch.zeros(c_local, len(layer_ids), E, dtype=dtype),
    )
    return dict(shard=shard, layout=layout, shard_s=shard_s, c_local=c_local, dtype=dtype)


def _hidden(env: dict, spec: dict, model: dict, args):
    import torch

    s_local = args.seq // (spec["tp"] * spec["cp"])
    return torch.zeros(()).expand(s_local, 1, model["hidden"])


def _replay(env: dict, data: dict, spec: dict, model: dict, args, baseline: bool) -> dict:
    """The replay entry (timed) and, for this package, a 1F1B schedule of the stage's router
    and dispatcher calls with the memory accounting of the header."""
    import torch

    from megatron_pr2 import routing

    layers, M = env["layers"], args.microbatches
    routes = [data["shard"]] * M
    hidden = _hidden(env, spec, model, args)
    t_local = hidden.shape[0]
    routing_map = torch.zeros((), dtype=torch.bool).expand(t_local, model["experts"])
    out: Dict[str, float] = {}
    times = []
    for _ in range(args.entry_repeats - 1):  # entered and left at once (no forward)
        t0 = _cpu_seconds()
        context = routing(layers, "replay", routes, ministep=2)
        context.__enter__()
        times.append(_cpu_seconds() - t0)
        try:
            context.__exit__(None, None, None)
        except RuntimeError:  # "left unconsumed": no microbatch ran
            pass
    t0 = _cpu_seconds()
    context = routing(layers, "replay", routes, ministep=2)
    context.__enter__()
    times.append(_cpu_seconds() - t0)
    # The first entry of a process also pays the first touch of the host memory it keeps (page
    # faults, which vary from run to run on a VM); a training process enters once per mini-step.
    out["entry_s"], out["entry_first_s"] = min(times), times[0]
    session = layers[0].router.session
    routers = [layer.router for layer in layers]
    plan_bytes = 0
    traffic = {}
    plan = getattr(layers[0].token_dispatcher.preprocess, "__self__", None)
    if hasattr(layers[0].token_dispatcher.preprocess, "__closure__"):
        # The plan installs a lambda closing over the plan object.
        for cell in layers[0].token_dispatcher.preprocess.__closure__ or ():
            if type(cell.cell_contents).__name__ == "DispatchPlan":
                plan = cell.cell_contents
    if plan is not None and hasattr(plan, "traffic"):
        traffic = dict(plan.traffic)
        plan_bytes = traffic.pop("table_bytes")
    elif plan is not None:  # the baseline: [W, M, L, E] int32 gathered + int64 host copy
        W = layers[0].token_dispatcher.tp_ep_group.size()
        cells = W * M * len(layers) * model["experts"]
        traffic = dict(bytes_sent=M * len(layers) * model["experts"] * 4, bytes_received=cells * 4)
        plan_bytes = cells * (4 + 8)
    out["plan_bytes"] = plan_bytes
    out.update(traffic)
    held: Dict[int, int] = {}
    peak = 0
    residency = getattr(session, "residency", None)

    def forward(m: int) -> None:
        nonlocal peak
        for layer, router in zip(layers, routers):
            answer = session.ask(router, hidden)
            layer.token_dispatcher.preprocess(routing_map)
            if answer.train_predictor and answer.cache_hidden is not None:
                saved = answer.cache_hidden.numel() * answer.cache_hidden.element_size()
                saved += 2 * answer.cache_hidden.shape[0] * model["experts"] * 4
                held[m] = held.get(m, 0) + saved
            resident = residency.stats.resident_bytes if residency is not None else 0
            peak = max(peak, resident + sum(held.values()) + plan_bytes)

    t0 = _cpu_seconds()
    if baseline:
        # It keeps every bound microbatch on the device until the context ends: bind 2 x PP
        # (to bound this process's memory) and scale to M.
        bound = min(M, 2 * spec["pp"])
        for m in range(bound):
            forward(m)
        out["forward_calls_s"] = (_cpu_seconds() - t0) * M / bound
        local = getattr(session, "_local", {})
        kept = sum(
            t.numel() * t.element_size()
            for entry in local.values()
            for t in vars(entry).values()
            if isinstance(t, torch.Tensor)
        )
        out["device_peak_bytes"] = kept * M // bound + plan_bytes
        try:
            context.__exit__(None, None, None)
        except RuntimeError:  # "left unconsumed": only `bound` microbatches ran
            pass
        return out
    else:
        warmup = min(spec["pp"] - 1, M)  # stage 0 of a 1F1B pipeline
        for m in range(warmup):
            forward(m)
        for m in range(warmup, M):
            forward(m)
            held.pop(m - warmup, None)  # that microbatch's backward
        for m in range(M - warmup, M):
            held.pop(m, None)
        out["forward_calls_s"] = _cpu_seconds() - t0
        out["device_peak_bytes"] = peak
        out["residency_peak_bytes"] = residency.stats.peak_bytes
        out["residency_peak_microbatches"] = residency.stats.peak_microbatches
        out["uploads"] = residency.stats.uploads
    context.__exit__(None, None, None)
    return out


def _record(env: dict, data: dict, spec: dict, model: dict, args) -> dict:
    import torch

    from megatron_pr2 import routing
    from megatron_pr2.route_answer import Recorded

    layers = env["layers"]
    hidden = _hidden(env, spec, model, args)
    t_local = hidden.shape[0]
    count = min(args.microbatches, 2 * spec["pp"])
    gen = torch.Generator().manual_seed(2)
    E = model["experts"]
    start = torch.randint(0, E, (t_local, 1), generator=gen)
    stride = 2 * torch.randint(0, E // 2, (t_local, 1), generator=gen) + 1
    top = [(start + stride * torch.arange(model["topk"])) % E] * len(layers)
    t0 = _cpu_seconds()
    with torch.no_grad(), routing(layers, "predict_record") as handle:
        session = layers[0].router.session
        for _ in range(count):
            for j, layer in enumerate(layers):
                answer = session.ask(layer.router, hidden)
                c = answer.cache_rows.numel()
                meta = dict(device="meta", dtype=torch.float32)
                session.save(
                    layer.router,
                    Recorded(
                        top[j],
                        None,
                        torch.empty(c, model["hidden"], **meta),
                        torch.empty(c, model["experts"], **meta),
                    ),
                )
        calls_s = _cpu_seconds() - t0
        t0 = _cpu_seconds()
        routes = handle.routes_per_microbatch
        pack_s = _cpu_seconds() - t0
    cache = routes[0].cache
    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.hidden, cache.logits))
    return dict(
        record_calls_s_per_mb=calls_s / count,
        record_pack_s_per_mb=pack_s / count,
        record_host_bytes_per_mb=routes[0].nbytes + cache_bytes,
    )


def child(layout_name: str, args, baseline: bool) -> dict:
    import torch

    from megatron_pr2.routes import narrowest_int_dtype

    spec, start = LAYOUTS[layout_name], _cpu_seconds()
    model = MODELS[spec["model"]]
    env = _setup(spec, model, args)
    data = _routes(spec, model, env, args)
    shard = data["shard"]
    out = dict(layout=layout_name, world=env["world"], stage_layers=env["stage_layers"])
    out["t_local"] = shard.shape[0]
    out["c_local"] = data["c_local"]
    out["shard_s"] = data["shard_s"]
    out.update(_replay(env, data, spec, model, args, baseline))
    if not baseline:
        out.update(_record(env, data, spec, model, args))
        # Physical minima of this rank.
        narrow = torch.empty((), dtype=narrowest_int_dtype(model["experts"])).element_size()
        routes_mb = shard.shape[0] * shard.shape[1] * shard.shape[2] * narrow
        elem = data["dtype"].itemsize
        cache_mb = data["c_local"] * shard.shape[1] * (model["hidden"] + model["experts"]) * elem
        out["in_flight_microbatches"] = min(spec["pp"], args.microbatches)
        out["in_flight_min_bytes"] = out["in_flight_microbatches"] * (routes_mb + cache_mb)
        W = env["layers"][0].token_dispatcher.tp_ep_group.size()
        e_local = model["experts"] // spec["ep"]
        out["plan_min_received_bytes"] = args.microbatches * shard.shape[1] * W * e_local * 4
        out["host_routes_bytes"] = args.microbatches * shard.nbytes
        out["host_decoded_bytes"] = args.microbatches * routes_mb
        out["host_cache_bytes"] = args.microbatches * cache_mb
        # The decode floor: unpacking every microbatch's routes once (timed on one, x M).
        t0 = _cpu_seconds()
        shard.decode_indices(narrowest_int_dtype(model["experts"]))
        out["decode_floor_s"] = (_cpu_seconds() - t0) * args.microbatches
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["child_cpu_s"] = _cpu_seconds() - start
    return out


# -------------------------------------------------------------------------------------------------
# parent
# -------------------------------------------------------------------------------------------------
def _spawn(layout: str, args, baseline: Optional[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-W", "ignore", "-m", "benchmarks.sim_scale", "--child", layout]
    argv += ["--microbatches", str(args.microbatches), "--seq", str(args.seq)]
    argv += ["--cache-tokens", str(args.cache_tokens), "--cache-dtype", args.cache_dtype]
    argv += ["--entry-repeats", str(args.entry_repeats)]
    if baseline:
        argv += ["--as-baseline", baseline]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{layout} ({baseline or 'this checkout'}) failed:\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: List[dict], baselines: Dict[str, dict]) -> str:
    lines = [
        "| layout (world) | T_local / C_local / L_stage | entry CPU s (baseline; ratio) | "
        "first entry of the process CPU s (baseline; ratio) | decode floor s | "
        "forward router calls CPU s (baseline) | device peak MiB (in-flight min; ratio) | "
        "plan bytes sent / received MiB (min received) | plan tables MiB (baseline) | "
        "record per mb: CPU ms, pack ms, host MiB | host: routes / decoded / cache GiB | sharding s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = baselines.get(r["layout"])
        entry = f"{r['entry_s']:.2f}"
        calls = f"{r['forward_calls_s']:.2f}"
        tables = f"{_mib(r['plan_bytes']):.1f}"
        first = f"{r.get('entry_first_s', r['entry_s']):.2f}"
        if b:
            entry += f" ({b['entry_s']:.2f}; {r['entry_s'] / b['entry_s']:.3f})"
            b_first = b.get("entry_first_s", b["entry_s"])
            first += f" ({b_first:.2f}; {r.get('entry_first_s', r['entry_s']) / b_first:.3f})"
            calls += f" ({b['forward_calls_s']:.2f})"
            tables += f" ({_mib(b['plan_bytes']):.0f})"
        ratio = r["device_peak_bytes"] / r["in_flight_min_bytes"]
        lines.append(
            f"| {r['layout']} ({r['world']}) | {r['t_local']} / {r['c_local']} / "
            f"{r['stage_layers']} | {entry} | {first} | {r['decode_floor_s']:.2f} | {calls} | "
            f"{_mib(r['device_peak_bytes']):.0f} ({_mib(r['in_flight_min_bytes']):.0f}; "
            f"{ratio:.2f}) | {_mib(r.get('bytes_sent', 0)):.2f} / "
            f"{_mib(r.get('bytes_received', 0)):.2f} ({_mib(r['plan_min_received_bytes']):.2f}) | "
            f"{tables} | {1e3 * r['record_calls_s_per_mb']:.1f}, "
            f"{1e3 * r['record_pack_s_per_mb']:.1f}, {_mib(r['record_host_bytes_per_mb']):.1f} | "
            f"{r['host_routes_bytes'] / 2**30:.2f} / {r['host_decoded_bytes'] / 2**30:.2f} / "
            f"{r['host_cache_bytes'] / 2**30:.1f} | {r['shard_s']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PR2 scale simulator (one rank, fake world)")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help=f"comma list of {list(LAYOUTS)}"
    )
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--seq", type=int, default=16384, help="tokens per sequence (1 per mb)")
    parser.add_argument("--cache-tokens", type=int, default=2048, help="cached tokens per sequence")
    parser.add_argument("--cache-dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--baseline", default=None, help="checkout to compare (e.g. d1de9d6)")
    parser.add_argument(
        "--entry-repeats",
        type=int,
        default=1,
        help="routing() entries timed per process (both checkouts); entry = the minimum, "
        "entry_first_s = the first (which also pays the first touch of the memory it keeps)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--as-baseline", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.child:
        if args.as_baseline:
            # The other checkout's package, ahead of this one (which `-m` put on the path).
            assert "megatron_pr2" not in sys.modules
            sys.path.insert(0, args.as_baseline)
            args.cache_dtype = "fp32"  # the baseline caches fp32 only
        out = child(args.child, args, bool(args.as_baseline))
        out["megatron_pr2"] = os.path.dirname(sys.modules["megatron_pr2"].__file__)
        print(json.dumps(out))
        return {}
    names = [n for n in args.layouts.split(",") if n]
    for name in names:
        if name not in LAYOUTS:
            raise ValueError(f"--layouts: unknown layout {name!r}; known: {list(LAYOUTS)}")
    results, baselines = [], {}
    for name in names:
        results.append(_spawn(name, args, None))
        print(json.dumps(results[-1]), flush=True)
        if args.baseline:
            baselines[name] = _spawn(name, args, os.path.abspath(args.baseline))
            print(json.dumps(baselines[name]), flush=True)
    table = report(results, baselines)
    print(table)
    bar = [r for r in results if r["layout"] == BAR_LAYOUT]
    for r in bar:
        checks = dict(
            memory_ratio=r["device_peak_bytes"] / r["in_flight_min_bytes"],
            plan_received_over_min=r["bytes_received"] / r["plan_min_received_bytes"],
        )
        if BAR_LAYOUT in baselines:
            checks["entry_ratio"] = r["entry_s"] / baselines[BAR_LAYOUT]["entry_s"]
        print(f"bar ({BAR_LAYOUT}): {checks}")
    out = dict(args=vars(args), results=results, baselines=baselines, table=table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
