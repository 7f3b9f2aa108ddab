# PR2 router overhead next to Megatron-Core's stock TopKRouter and its own routing replay.
#
# One process builds, per shape, Megatron-Core MoELayers that differ ONLY in the router (they
# share one expert module, one input and identical router weights):
#   stock            TopKRouter (Megatron's default)
#   megatron_record  TopKRouter with moe_enable_routing_replay, RouterReplayAction.RECORD
#   megatron_replay  same router, REPLAY_FORWARD of indices recorded on the same input
#   pr2_off          PR2Router outside any routing() context (must equal stock)
#   pr2_record       routing(..., "record") + packing the RouteBatch (handle.routes)
#   pr2_predict_record  routing(..., "predict_record") + RouteBatch with predictor cache
#   pr2_replay       routing(..., "replay", R2 routes, ministep=1): PR2 as plain R2
#   pr2_replay_cache_m1 replay of PR2 routes WITH a predictor cache at ministep 1 (no loss)
#   pr2_replay_ploss replay of PR2 routes with cache at ministep 2 (kl-post predictor loss)
#   ...+tel          the replay variants with PR2Config.telemetry=True (the default config;
#                    --telemetry-stride sets PR2Config.telemetry_stride)
# and times, interleaved round-robin across variants (warm-up excluded):
#   layer      MoELayer forward + backward
#   router     router forward + backward alone (where PR2 adds its work)
#   layer_fwd  MoELayer forward under no_grad (the old-policy / record pass of RL)
#   router_fwd router forward alone under no_grad
# Every timed call runs --microbatches K microbatches inside ONE context (a routing() context, or
# Megatron's RouterReplay set up once), as a training step does, and reports the time per
# microbatch: a context's entry (route decoding, session set-up) is amortised over K router
# calls here, over M microbatches x L layers in a real step.
#
# Op counts (per variant, router fwd+bwd, and router fwd under no_grad when --parts has
# router_fwd): compute ops of one router call inside a context
# (the marginal cost of microbatch K+1 over K: the hot path) and of the context itself (entry,
# exit and packing, once per context).
#
# Shapes: hidden states [S, B, H] (sequence-major, Megatron convention); router tokens T = S * B;
# probs [T, E]. fp32 on CPU, bf16 params with an fp32 router on CUDA (--dtype to override).
#
# Usage:  python -m benchmarks.bench_router [--shapes small|large|micro] [--device cpu|cuda]
#         [--repeats N] [--warmup N] [--json PATH] [--profile VARIANT,...]

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `megatron_pr2` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (
    Stats,
    Timer,
    init_single_process,
    paired_ratio,
    run_interleaved,
)
from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape."""

    hidden: int
    """Hidden size H (router input width)."""
    experts: int
    """Number of routed experts E."""
    topk: int
    """Experts per token k."""
    tokens: int
    """Router tokens T = seq_length * micro_batch."""
    ffn: int
    """moe_ffn_hidden_size of each (SwiGLU) expert."""
    micro_batch: int = 1
    """Sequences per microbatch B (seq_length = tokens / B)."""

    @property
    def seq_length(self) -> int:
        return self.tokens // self.micro_batch

    @property
    def name(self) -> str:
        return f"h{self.hidden}-e{self.experts}-k{self.topk}-t{self.tokens}"


SHAPES: Dict[str, List[Shape]] = {
    # Seconds in total: for the smoke test only.
    "micro": [Shape(hidden=64, experts=8, topk=2, tokens=128, ffn=64)],
    "small": [
        Shape(hidden=256, experts=8, topk=2, tokens=2048, ffn=512),
        Shape(hidden=512, experts=32, topk=4, tokens=2048, ffn=512),
    ],
    # The second is one Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts, top-8, ffn 768).
    "large": [
        Shape(hidden=1024, experts=64, topk=8, tokens=4096, ffn=512),
        Shape(hidden=2048, experts=128, topk=8, tokens=4096, ffn=768),
    ],
}

ALL_VARIANTS = (
    "stock",
    "megatron_record",
    "megatron_replay",
    "pr2_off",
    "pr2_record",
    "pr2_predict_record",
    "pr2_replay",
    "pr2_replay+tel",
    "pr2_replay_cache_m1",
    "pr2_replay_cache_m1+tel",
    "pr2_replay_ploss",
    "pr2_replay_ploss+tel",
)

# (name, numerator, denominator, target or None): targets of issue 13 (predict_record: router
# fwd under no_grad; the replay ratios: router fwd+bwd).
RATIOS = (
    ("predict_record / stock", "pr2_predict_record", "stock", 1.10),
    ("replay+ploss / stock", "pr2_replay_ploss", "stock", 1.15),
    ("replay+ploss+tel / stock", "pr2_replay_ploss+tel", "stock", None),
    ("pr2 replay / megatron replay", "pr2_replay", "megatron_replay", 1.05),
    ("pr2 replay+tel / megatron replay", "pr2_replay+tel", "megatron_replay", None),
    ("pr2 record / megatron record", "pr2_record", "megatron_record", None),
    ("megatron replay / stock", "megatron_replay", "stock", None),
    ("pr2 replay / stock", "pr2_replay", "stock", None),
    ("replay cache m1 / pr2 replay", "pr2_replay_cache_m1", "pr2_replay", None),
    ("pr2_off / stock", "pr2_off", "stock", None),
)

PARTS = ("layer", "router", "layer_fwd", "router_fwd")


def make_config(shape: Shape, device: str, dtype: torch.dtype, dispatcher: str, **overrides):
    """TransformerConfig of one MoE layer (SwiGLU experts, aux loss on, no dropout)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    half = dtype in (torch.bfloat16, torch.float16)
    fields = dict(
        num_layers=1,
        hidden_size=shape.hidden,
        ffn_hidden_size=4 * shape.hidden,
        num_attention_heads=max(1, shape.hidden // 64),
        num_moe_experts=shape.experts,
        moe_router_topk=shape.topk,
        moe_ffn_hidden_size=shape.ffn,
        moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3,
        gated_linear_unit=True,
        activation_func=F.silu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        moe_router_dtype="fp32" if half else None,
        **PLAIN_CONFIG_FIELDS,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def moe_spec(num_experts: int, spec: str):
    """Megatron's MoE-layer spec: "local" (SequentialMLP) or "te" (TEGroupedMLP, GPU + TE)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts).submodules.mlp
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=True
    ).submodules.mlp


def build_layer(spec, config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    pg = ProcessGroupCollection.use_mpu_process_groups()
    if isinstance(spec, functools.partial):  # megatron-core >= 0.17 spec form
        layer = spec(config=config, layer_number=1, pg_collection=pg)
    else:
        layer = build_module(spec, config=config, layer_number=1, pg_collection=pg)
    layer.set_layer_number(1)
    if torch.cuda.is_available():
        # As Megatron's get_model does (model.cuda()): PR2's predictor is created on the CPU.
        layer.cuda(torch.cuda.current_device())
    layer.train()
    return layer


class Bench:
    """The layers of one shape and the timed callables of every variant."""

    def __init__(self, shape: Shape, args: argparse.Namespace) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

        from megatron_pr2 import PR2Config, apply_pr2, routing

        self.shape = shape
        self.args = args
        self.microbatches = args.microbatches
        self.routing = routing
        self.Action = RouterReplayAction
        dtype = args.torch_dtype
        device = torch.device(args.device)
        config = make_config(shape, args.device, dtype, args.dispatcher)
        spec = moe_spec(shape.experts, args.spec)
        # RouterReplay keeps a process-global list of instances: start from an empty one.
        RouterReplay.clear_global_router_replay_instances()

        self.layers = {"stock": build_layer(spec, config)}
        replay_config = dataclasses.replace(config, moe_enable_routing_replay=True)
        self.layers["megatron"] = build_layer(spec, replay_config)
        self.replay = self.layers["megatron"].router.router_replay
        # The benchmark drives this one instance directly; keep the global list empty.
        RouterReplay.clear_global_router_replay_instances()
        cache_tokens = max(1, shape.seq_length // args.cache_fraction)
        self.pr2_configs = {}
        for telemetry in (False, True):
            pr2_config = PR2Config(
                telemetry=telemetry,
                telemetry_stride=args.telemetry_stride,
                cache_tokens_per_sequence=cache_tokens,
            )
            key = "pr2+tel" if telemetry else "pr2"
            self.layers[key] = build_layer(apply_pr2(spec, pr2_config), config)
            self.pr2_configs[key] = pr2_config

        # Same experts, same router weights: variants differ only in the routing decision path.
        stock = self.layers["stock"]
        for name, layer in self.layers.items():
            if layer is not stock:
                layer.experts = stock.experts
                layer.router.weight.data.copy_(stock.router.weight.data)

        generator = torch.Generator().manual_seed(args.seed)
        S, B, H = shape.seq_length, shape.micro_batch, shape.hidden

        def randn(*size):
            return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

        self.x = randn(S, B, H).requires_grad_(True)
        self.grad_out = randn(S, B, H)
        self.grad_probs = randn(S * B, shape.experts).float()
        if dtype != torch.float32 and config.moe_router_dtype is None:
            self.grad_probs = self.grad_probs.to(dtype)

        # Routes to replay, recorded once on the same input (the old-policy pass: no_grad).
        with torch.no_grad():
            self.replay.set_router_replay_action(RouterReplayAction.RECORD)
            self.layers["megatron"](self.x)
            self.megatron_indices = self.replay.get_recorded_indices().clone()
            self.replay.clear_indices()
            with routing(self.layers["pr2"], "record") as handle:
                self.layers["pr2"](self.x)
            self.r2_routes = handle.routes
            with routing(self.layers["pr2"], "predict_record") as handle:
                self.layers["pr2"](self.x)
            self.pr2_routes = handle.routes
        assert self.pr2_routes.cache is not None, "predict_record produced no predictor cache"
        # Zero predictor + same weights: every router picks the same experts.
        same = torch.equal(
            self.r2_routes.indices[:, 0].sort(-1).values,
            self.pr2_routes.indices[:, 0].sort(-1).values,
        )
        assert same, "PR2 record and predict_record (zero predictor) disagree"
        self.cached_tokens = int(self.pr2_routes.cache.token_index.numel())

    # -- one variant = (layer, context factory, post-processing of the handle) ---------------
    def _megatron_context(self, action):
        replay = self.replay

        @contextlib.contextmanager
        def context():
            replay.clear_indices()
            if action == self.Action.REPLAY_FORWARD:
                replay.set_target_indices(self.megatron_indices)
            replay.set_router_replay_action(action)
            try:
                yield None
            finally:
                replay.clear_router_replay_action()

        return context

    def _pr2_context(self, layer, mode, routes=None, ministep=1):
        routing = self.routing

        def context():
            if routes is None:
                return routing(layer, mode, ministep=ministep)
            return routing(layer, mode, [routes] * self.microbatches, ministep=ministep)

        return context

    def variant(self, name: str):
        """(layer, context factory, post(handle)) of a variant name from ALL_VARIANTS."""
        key = "pr2+tel" if name.endswith("+tel") else "pr2"
        base = name.removesuffix("+tel")
        pr2 = self.layers[key]
        pack = lambda handle: handle.routes_per_microbatch  # noqa: E731 - records must pack
        none = lambda handle: None  # noqa: E731
        table = {
            "stock": (self.layers["stock"], contextlib.nullcontext, none),
            "megatron_record": (
                self.layers["megatron"],
                self._megatron_context(self.Action.RECORD),
                none,
            ),
            "megatron_replay": (
                self.layers["megatron"],
                self._megatron_context(self.Action.REPLAY_FORWARD),
                none,
            ),
            "pr2_off": (pr2, contextlib.nullcontext, none),
            "pr2_record": (pr2, self._pr2_context(pr2, "record"), pack),
            "pr2_predict_record": (pr2, self._pr2_context(pr2, "predict_record"), pack),
            "pr2_replay": (pr2, self._pr2_context(pr2, "replay", self.r2_routes, 1), none),
            "pr2_replay_cache_m1": (
                pr2,
                self._pr2_context(pr2, "replay", self.pr2_routes, 1),
                none,
            ),
            "pr2_replay_ploss": (
                pr2,
                self._pr2_context(pr2, "replay", self.pr2_routes, 2),
                none,
            ),
        }
        if base not in table:
            raise ValueError(f"--variants: unknown variant {name!r}; known: {ALL_VARIANTS}")
        return table[base]

    def job(self, name: str, part: str, microbatches: Optional[int] = None) -> Callable[[], None]:
        """One timed call: `microbatches` (default --microbatches) microbatches of `part` in
        one context of variant `name`."""
        self.microbatches = microbatches or self.args.microbatches
        count = self.microbatches
        layer, context, post = self.variant(name)
        x, grad_out, grad_probs = self.x, self.grad_out, self.grad_probs

        if part == "layer":

            def step():
                out, _ = layer(x)
                out.backward(grad_out)

        elif part == "router":

            def step():
                probs, _ = layer.router(x)
                probs.backward(grad_probs.to(probs.dtype))

        elif part == "router_fwd":

            def step():
                layer.router(x)

        elif part == "layer_fwd":

            def step():
                layer(x)

        else:
            raise ValueError(f"--parts: unknown part {part!r}; known: {PARTS}")
        grad = not part.endswith("_fwd")

        def run():
            with torch.set_grad_enabled(grad), context() as handle:
                for _ in range(count):
                    step()
                post(handle)

        return run

    def zero_grads(self) -> None:
        for layer in self.layers.values():
            for param in layer.parameters():
                param.grad = None
                if hasattr(param, "main_grad"):
                    param.main_grad = None
        self.x.grad = None


def summarize(times: Dict[str, List[float]], variants: List[str]) -> Dict[str, dict]:
    out = {"times_ms": {v: Stats.of(times[v]).as_dict() for v in variants}, "ratios": {}}
    for label, num, den, target in RATIOS:
        if num in times and den in times:
            stats = paired_ratio(times, num, den)
            out["ratios"][label] = dict(stats.as_dict(), target=target)
    return out


def print_part(shape_name: str, part: str, summary: dict) -> None:
    print(f"\n[{shape_name}] {part}: ms per call, median [q1, q3] (min-max)")
    stock = summary["times_ms"].get("stock", {}).get("median")
    for name, s in summary["times_ms"].items():
        rel = f"  x{s['median'] / stock:.3f} stock" if stock else ""
        print(
            f"  {name:26s} {s['median']:10.3f} [{s['q1']:.3f}, {s['q3']:.3f}] "
            f"({s['min']:.3f}-{s['max']:.3f}){rel}"
        )
    print(f"[{shape_name}] {part}: paired per-round ratios, median [q1, q3]")
    for label, r in summary["ratios"].items():
        verdict = ""
        if r["target"] is not None:
            verdict = "  ok" if r["median"] <= r["target"] else f"  MISS (target <= {r['target']})"
            verdict = f"  target {r['target']:.2f}:{verdict.split(':')[-1]}"
        print(f"  {label:34s} {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]{verdict}")


# Metadata-only aten ops (no kernel on a GPU); everything else counts as a compute op.
_META_OPS = frozenset(
    "aten::" + name
    for name in (
        "view _unsafe_view reshape _reshape_alias as_strided t transpose permute expand "
        "unsqueeze squeeze select slice detach alias empty empty_strided empty_like lift_fresh "
        "resolve_conj resolve_neg to contiguous result_type size stride is_nonzero item split "
        "split_with_sizes chunk unbind flatten numpy_T"
    ).split()
)


def count_ops(run: Callable[[], None], between: Callable[[], None]) -> Dict[str, int]:
    """Hardware-independent cost proxies of one call, from a torch.profiler trace.

    compute_ops: leaf aten ops that would launch a kernel on a GPU (launch-bound there for
    router-sized tensors). host_syncs: aten::_local_scalar_dense calls (.item(), bool(),
    int(), float() of a tensor): each blocks the host until the GPU catches up when the tensor
    lives on the GPU. On CPU-resident route tensors they cost nothing; see README for which.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    between()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    between()
    return _op_counts(prof)


def count_call_ops(bench: "Bench", name: str, grad: bool = True) -> Dict[str, int]:
    """Router fwd+bwd ops of variant `name` (grad=False: router fwd under no_grad): of one router
    call in the middle of a context (the second of three microbatches, gradients cleared before
    each, so no accumulation op: the hot path), and of the rest of a one-microbatch context
    (entry, binding, exit, packing)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    layer, context, post = bench.variant(name)
    bench.microbatches = 3
    with torch.set_grad_enabled(grad), context() as handle:
        for step in range(3):
            bench.zero_grads()
            profiled = step == 1
            profiler = torch_profile(activities=[ProfilerActivity.CPU])
            with profiler if profiled else contextlib.nullcontext():
                probs, _ = layer.router(bench.x)
                if grad:
                    probs.backward(bench.grad_probs.to(probs.dtype))
            if profiled:
                call = _op_counts(profiler)
        post(handle)
    bench.zero_grads()
    part = "router" if grad else "router_fwd"
    whole = count_ops(bench.job(name, part, microbatches=1), bench.zero_grads)
    bench.microbatches = bench.args.microbatches
    return dict(call, **{f"context_{key}": whole[key] - call[key] for key in call})


def _op_counts(prof) -> Dict[str, int]:

    def compute(event) -> bool:
        return event.name.startswith("aten::") and event.name not in _META_OPS

    events = prof.events()
    leaves = [e for e in events if compute(e) and not any(compute(c) for c in e.cpu_children)]
    syncs = [e for e in events if e.name == "aten::_local_scalar_dense"]
    return dict(compute_ops=len(leaves), host_syncs=len(syncs))


def derived_layer_ratios(entry: dict, router_part: str, layer_part: str) -> Dict[str, float]:
    """Layer ratio estimated as 1 + (router delta) / (layer time of the denominator).

    Variants share experts, dispatcher and input and produce the same routing_map, so their
    layer times differ only by their router time; the router-alone delta (median of paired
    per-round differences) is far less noisy than the difference of two layer timings. A
    denominator without its own layer timing uses the stock layer time (same experts).
    """
    parts = entry["parts"]
    if router_part not in parts or layer_part not in parts:
        return {}
    raw = parts[router_part]["raw_ms"]
    layer_ms = {name: s["median"] for name, s in parts[layer_part]["times_ms"].items()}
    out = {}
    for label, num, den, _ in RATIOS:
        base = layer_ms.get(den, layer_ms.get("stock"))
        if num in raw and den in raw and base:
            delta = Stats.of([a - b for a, b in zip(raw[num], raw[den])]).median
            out[label] = 1.0 + delta / base
    return out


def profile(bench: Bench, names: List[str], part: str, iterations: int, rows: int) -> None:
    """torch.profiler table (self time) of a few iterations per variant: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if bench.args.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    for name in names:
        run = bench.job(name, part)
        run()
        bench.zero_grads()
        with torch_profile(activities=activities) as prof:
            for _ in range(iterations):
                run()
                bench.zero_grads()
        print(f"\n[profile {bench.shape.name}] {name} / {part}, {iterations} iterations")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def git_commit() -> str:
    """HEAD of the megatron-pr2 checkout, with "+dirty" when megatron_pr2/ has local edits."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "megatron_pr2"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__ or "PR2 router benchmark")
    parser.add_argument("--shapes", default="small", help=f"one of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtype", default=None, choices=("fp32", "bf16"), help="cpu: fp32, cuda: bf16"
    )
    parser.add_argument("--dispatcher", default="alltoall", choices=("alltoall", "allgather"))
    parser.add_argument(
        "--spec", default="local", choices=("local", "te"), help="te: TEGroupedMLP (GPU+TE)"
    )
    parser.add_argument("--parts", default="layer,router", help=f"comma list of {PARTS}")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument(
        "--layer-variants",
        default=None,
        help="variants of the layer / layer_fwd parts (default: --variants); the derived layer "
        "ratios cover every router variant",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (layer)")
    parser.add_argument("--router-repeats", type=int, default=None, help="timed rounds (router)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--microbatches",
        type=int,
        default=4,
        help="microbatches per context (per timed call); times are per microbatch",
    )
    parser.add_argument(
        "--cache-fraction",
        type=int,
        default=8,
        help="predictor cache keeps seq_length / N tokens per sequence (paper: 2K of 16K = 8)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="CPU timer: wall (perf_counter) or cpu (process CPU time, for a loaded machine)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--telemetry-stride",
        type=int,
        default=1,
        help="PR2Config.telemetry_stride of the +tel variants (1 = every router row)",
    )
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    parser.add_argument(
        "--no-count-ops",
        dest="count_ops",
        action="store_false",
        help="skip counting aten ops / host syncs per router call",
    )
    parser.add_argument("--profile", default="", help="comma list of variants to profile")
    parser.add_argument("--profile-part", default="router", choices=PARTS)
    parser.add_argument("--profile-iterations", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    if args.shapes not in SHAPES:
        raise ValueError(f"--shapes={args.shapes!r}: must be one of {sorted(SHAPES)}")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    args.dtype = dtype
    if args.repeats is None:
        args.repeats = {"micro": 3, "small": 15, "large": 7}[args.shapes]
        if args.device == "cuda":
            args.repeats = 50
    if args.router_repeats is None:
        args.router_repeats = 3 * args.repeats
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_process(args.device, args.seed)
    import megatron.core

    variants = [v for v in args.variants.split(",") if v]
    layer_variants = variants
    if args.layer_variants:
        layer_variants = [v for v in args.layer_variants.split(",") if v]
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"--parts: unknown part {part!r}; known: {PARTS}")
    machine = dict(
        device=args.device,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        megatron_core=megatron.core.__version__,
        python=platform.python_version(),
        megatron_pr2_commit=git_commit(),
    )
    print(f"machine: {machine}")
    print(
        f"settings: dtype={args.dtype} dispatcher={args.dispatcher} spec={args.spec} "
        f"clock={'cuda-events' if args.device == 'cuda' else args.clock} "
        f"repeats={args.repeats} router_repeats={args.router_repeats} warmup={args.warmup}"
    )
    results = dict(machine=machine, argv=sys.argv[1:] if argv is None else argv, shapes={})
    timer = Timer(args.device, args.clock)
    for shape in SHAPES[args.shapes]:
        bench = Bench(shape, args)
        print(
            f"\n=== shape {shape.name}: hidden {shape.hidden}, {shape.experts} experts, top-"
            f"{shape.topk}, {shape.tokens} tokens ([S={shape.seq_length}, B={shape.micro_batch}]),"
            f" expert ffn {shape.ffn} (SwiGLU); predictor cache {bench.cached_tokens} tokens ==="
        )
        entry = dict(shape=dataclasses.asdict(shape), cached_tokens=bench.cached_tokens, parts={})
        for part in parts:
            names = variants if part.startswith("router") else layer_variants
            jobs = {name: bench.job(name, part) for name in names}
            repeats = args.router_repeats if part == "router" else args.repeats
            times = run_interleaved(jobs, timer, repeats, args.warmup, bench.zero_grads)
            times = {k: [t / args.microbatches for t in v] for k, v in times.items()}
            summary = summarize(times, names)
            summary["raw_ms"] = times
            entry["parts"][part] = summary
            print_part(shape.name, part, summary)
        for router_part, layer_part in (("router", "layer"), ("router_fwd", "layer_fwd")):
            derived = derived_layer_ratios(entry, router_part, layer_part)
            if derived:
                entry[f"derived_{layer_part}_ratios"] = derived
                print(
                    f"[{shape.name}] {layer_part} ratio derived from the {router_part} delta "
                    f"(1 + d_router / layer)"
                )
                for label, value in derived.items():
                    print(f"  {label:34s} {value:.4f}")
        if args.count_ops:
            counts = {}
            print(
                f"[{shape.name}] router fwd+bwd: compute ops and host syncs per router call in "
                "a context, and per context (entry, exit, packing)"
            )
            for name in variants:
                counts[name] = count_call_ops(bench, name)
                print(
                    f"  {name:26s} compute ops {counts[name]['compute_ops']:4d}   "
                    f"host syncs {counts[name]['host_syncs']:3d}   per context: compute ops "
                    f"{counts[name]['context_compute_ops']:4d}   host syncs "
                    f"{counts[name]['context_host_syncs']:3d}"
                )
            entry["op_counts"] = counts
            if "router_fwd" in parts:
                counts_fwd = {}
                print(f"[{shape.name}] router fwd under no_grad: the same counts")
                for name in variants:
                    counts_fwd[name] = count_call_ops(bench, name, grad=False)
                    print(
                        f"  {name:26s} compute ops {counts_fwd[name]['compute_ops']:4d}   "
                        f"host syncs {counts_fwd[name]['host_syncs']:3d}   per context: compute "
                        f"ops {counts_fwd[name]['context_compute_ops']:4d}   host syncs "
                        f"{counts_fwd[name]['context_host_syncs']:3d}"
                    )
                entry["op_counts_fwd"] = counts_fwd
        if args.profile:
            names = [v for v in args.profile.split(",") if v]
            profile(bench, names, args.profile_part, args.profile_iterations, args.profile_rows)
        results["shapes"][shape.name] = entry
        del bench
        gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
