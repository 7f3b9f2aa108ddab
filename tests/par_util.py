# Helpers for the multi-rank replay tests (test_parallel_*.py, test_predictor_parallel.py).
#
# Everything here runs inside a rank spawned by harness.run_distributed.
#
# Weights and gradients move between a single-process reference model and a sharded model through
# Megatron's own sharding metadata: every parameter appears in `sharded_state_dict()` as a
# ShardedTensor with a layout-independent key, `prepend_axis_num` leading axes (global layer /
# expert index; the local tensor has none of them) and a global offset. The reference (TP = PP =
# EP = 1) holds every slice, so a parallel parameter is `full[key, leading offsets][offset:...]`.
#
# Routes: a canonical RouteBatch has indices [T, L, k] with canonical token t = b * S + s
# (batch-major). Router rows on a rank are the flattened [s_local, b] input; TokenLayout.token_index
# gives the canonical token of each row. `RouteCapture` records the routing_map [T_local, E] each
# router returns, tagged with whether it ran inside backward (activation recompute).

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

FullKey = Tuple[str, Tuple[int, ...]]


# A 4-layer GPT whose first layer is dense, so MoE-layer ids differ from layer numbers.
MOE_LAYER_FREQ = [0, 1, 1, 1]


def tiny_gpt_config(**overrides: Any) -> Any:
    """The tiny fp32 MoE GPT config of the multi-rank replay tests (harness.make_moe_config)."""
    from harness import make_moe_config

    return make_moe_config(
        num_layers=len(MOE_LAYER_FREQ),
        moe_layer_freq=MOE_LAYER_FREQ,
        hidden_size=32,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        pipeline_dtype=torch.float32,
        **overrides,
    )


def cpu_patches() -> None:
    """megatron_pr2's CPU / gloo patches; first thing in a rank, before any megatron-core import
    (megatron-core 0.19 imports triton at package import unless the patches stub it)."""
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()


def as_chunks(model: Any) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model below Megatron's DistributedDataParallel (or the module itself)."""
    return getattr(module, "module", module)


def sharded_params(model: Any) -> List[Tuple[str, Any, torch.nn.Parameter]]:
    """(parameter name, ShardedTensor, parameter) for every parameter of the model (chunks)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = []
    for chunk in as_chunks(model):
        chunk = unwrap(chunk)
        by_id = {id(p): (n, p) for n, p in chunk.named_parameters()}
        seen = set()
        for value in chunk.sharded_state_dict().values():
            if isinstance(value, ShardedTensor) and id(value.data) in by_id:
                name, param = by_id[id(value.data)]
                assert value.flattened_range is None, name
                out.append((name, value, param))
                seen.add(id(param))
        missing = [n for n, p in chunk.named_parameters() if id(p) not in seen]
        assert not missing, f"parameters without a ShardedTensor: {missing}"
    return out


def full_key(sh: Any) -> FullKey:
    return sh.key, tuple(int(x) for x in sh.global_offset[: sh.prepend_axis_num])


def local_slice(sh: Any, shape: torch.Size) -> Tuple[slice, ...]:
    offsets = sh.global_offset[sh.prepend_axis_num :]
    return tuple(slice(int(o), int(o) + n) for o, n in zip(offsets, shape))


def param_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """Megatron DDP keeps gradients in main_grad; plain modules in grad."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def full_tensors(model: Any, what: str = "data") -> Dict[FullKey, torch.Tensor]:
    """Clones of the unsharded reference's parameters ("data") or gradients ("grad")."""
    out = {}
    for name, sh, param in sharded_params(model):
        assert tuple(param.shape) == tuple(sh.global_shape[sh.prepend_axis_num :]), (
            f"{name}: reference parameter is sharded {tuple(param.shape)} vs "
            f"{tuple(sh.global_shape)}"
        )
        value = param.detach() if what == "data" else param_grad(param)
        out[full_key(sh)] = None if value is None else value.detach().clone()
    return out


def load_full(model: Any, full: Dict[FullKey, torch.Tensor]) -> None:
    """Copy each parameter's slice of the reference's full tensors into the sharded model."""
    with torch.no_grad():
        for _, sh, param in sharded_params(model):
            param.copy_(full[full_key(sh)][local_slice(sh, param.shape)])


def compare_to_full(
    model: Any, full: Dict[FullKey, torch.Tensor], what: str = "grad"
) -> Dict[str, float]:
    """Max abs difference per parameter name between the model and the reference slices."""
    out = {}
    for name, sh, param in sharded_params(model):
        mine = param.detach() if what == "data" else param_grad(param)
        ref = full[full_key(sh)]
        if mine is None or ref is None:
            out[name] = 0.0 if mine is None and ref is None else float("inf")
            continue
        ref = ref[local_slice(sh, param.shape)]
        out[name] = float((mine.float() - ref.float()).abs().max()) if mine.numel() else 0.0
    return out


def gradient_scale(full: Dict[FullKey, torch.Tensor]) -> float:
    """Largest reference gradient magnitude (to state tolerances relative to it)."""
    return max(float(g.abs().max()) for g in full.values() if g is not None and g.numel())


# ---------------------------------------------------------------------------------------------
# Router helpers
# ---------------------------------------------------------------------------------------------
def drift_routers(model: Any, seed: int = 99, scale: float = 1.0) -> None:
    """A simulated policy update: move every router weight by a fixed random step that depends
    only on (seed, global MoE-layer id), so the reference and every layout drift identically."""
    from megatron_pr2 import pr2_routers

    with torch.no_grad():
        for router in pr2_routers([unwrap(c) for c in as_chunks(model)]):
            gen = torch.Generator().manual_seed(seed * 1000 + router.moe_layer_id)
            step = torch.randn(router.weight.shape, generator=gen)
            router.weight.add_(step * scale * float(router.weight.std()))


def set_predictors(model: Any, seed: int = 5, std: float = 0.3) -> None:
    """Give every predictor the same non-zero weights on every layout (a trained-looking W_p)."""
    from megatron_pr2 import pr2_routers

    with torch.no_grad():
        for router in pr2_routers([unwrap(c) for c in as_chunks(model)]):
            gen = torch.Generator().manual_seed(seed * 1000 + router.moe_layer_id)
            for param in router.predictor.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


class RouteCapture:
    """Forward hooks on every PR2 router: routing_map [T_local, E] per call, in call order."""

    def __init__(self, model: Any) -> None:
        from megatron_pr2 import pr2_routers
        from megatron_pr2.session import _in_backward

        self.calls: Dict[int, List[Tuple[bool, torch.Tensor]]] = {}
        self._handles = []
        for router in pr2_routers([unwrap(c) for c in as_chunks(model)]):
            layer = router.moe_layer_id

            def hook(module, inputs, output, layer=layer):
                self.calls.setdefault(layer, []).append(
                    (_in_backward(), output[1].detach().clone())
                )

            self._handles.append(router.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def forward_maps(self, layer: int) -> List[torch.Tensor]:
        return [m for recompute, m in self.calls.get(layer, []) if not recompute]

    def recompute_maps(self, layer: int) -> List[torch.Tensor]:
        return [m for recompute, m in self.calls.get(layer, []) if recompute]


@contextlib.contextmanager
def capture_routes(model: Any) -> Iterator[RouteCapture]:
    capture = RouteCapture(model)
    try:
        yield capture
    finally:
        capture.remove()


def expert_sets(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """[T, k] ascending expert ids of a routing_map [T, E] (every row must route k experts)."""
    counts = routing_map.sum(dim=1)
    assert bool(
        (counts == topk).all()
    ), f"rows route {counts.unique().tolist()} experts, not {topk}"
    return torch.nonzero(routing_map)[:, 1].view(-1, topk)


def route_mismatches(
    routing_map: torch.Tensor,
    token_index: torch.Tensor,
    canonical: torch.Tensor,
    column: int,
) -> int:
    """Number of router rows whose expert set differs from canonical indices [T, L, k] at the
    row's canonical token and MoE-layer column."""
    topk = canonical.shape[-1]
    mine = expert_sets(routing_map, topk)
    expected = canonical[token_index, column].sort(dim=-1).values
    return int((mine != expected).any(dim=-1).sum())


def layer_columns(routes: Any) -> Dict[int, int]:
    """Global MoE-layer id -> column of a RouteBatch."""
    layers = routes.layer_index
    if layers is None:
        return {layer: layer for layer in range(routes.num_layers)}
    return {int(layer): col for col, layer in enumerate(layers.tolist())}


def check_capture(
    capture: RouteCapture,
    layouts: Sequence[Any],
    canonical: Sequence[Any],
    recompute: bool = False,
) -> Dict[str, int]:
    """Compare every captured router call with the canonical routes of its microbatch.

    layouts[m] / canonical[m]: TokenLayout and canonical RouteBatch of microbatch m (the n-th call
    of a router is microbatch n). Returns counts: calls checked and mismatching rows.
    """
    calls = mismatched = 0
    for layer in sorted(capture.calls):
        maps = capture.recompute_maps(layer) if recompute else capture.forward_maps(layer)
        assert len(maps) == len(canonical), (layer, len(maps), len(canonical))
        for m, routing_map in enumerate(maps):
            column = layer_columns(canonical[m])[layer]
            mismatched += route_mismatches(
                routing_map, layouts[m].token_index, canonical[m].indices, column
            )
            calls += 1
    return {"calls": calls, "mismatched_rows": mismatched}


def local_rows(canonical_rows: torch.Tensor, layout: Any) -> torch.Tensor:
    """Rows [T, ...] in canonical order -> this rank's router-row order [T_local, ...]."""
    return canonical_rows[layout.token_index]


def to_canonical(sbh: torch.Tensor) -> torch.Tensor:
    """[S, B, H] (sequence-major) -> [B * S, H] rows in canonical (batch-major) order."""
    return sbh.transpose(0, 1).reshape(-1, sbh.shape[-1])


def to_local(canonical_rows: torch.Tensor, layout: Any, batch_size: int) -> torch.Tensor:
    """[B * S, H] canonical rows -> this rank's [S_local, B, H] layer input."""
    rows = canonical_rows[layout.token_index]
    return rows.view(-1, batch_size, canonical_rows.shape[-1])


# ---------------------------------------------------------------------------------------------
# Tiny PR2 GPT models under Megatron's pipeline schedules
# ---------------------------------------------------------------------------------------------
def pr2_block_spec(config: Any, vp_stage: Optional[int] = None, **pr2_kwargs: Any) -> Any:
    """Local (no TE) decoder block spec of this (virtual) pipeline stage with PR2 routers;
    dense layers where config.moe_layer_freq says so. A stage of dense layers only keeps the
    stock spec (apply_pr2 refuses a spec without MoE layers)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_pr2 import PR2Config, apply_pr2
    from megatron_pr2.parallel import moe_layer_ids

    pp_rank = ps.get_pipeline_model_parallel_rank()
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank
    )
    vpp = config.virtual_pipeline_model_parallel_size
    stage_ids = moe_layer_ids(
        config, pp_rank, ps.get_pipeline_model_parallel_world_size(), vp_stage, vpp
    )
    if stage_ids.numel() == 0:
        return spec
    return apply_pr2(spec, PR2Config(**pr2_kwargs))


def build_pr2_gpt(
    config: Any, vocab_size: int, seq_length: int, vpp: Optional[int] = None, **pr2_kwargs: Any
) -> List[torch.nn.Module]:
    """Model chunks of this pipeline rank (one chunk without virtual pipelining)."""
    from harness import build_tiny_gpt
    from megatron.core import parallel_state

    chunks = []
    for vp_stage in range(vpp or 1):
        stage = None if vpp is None else vp_stage
        chunks.append(
            build_tiny_gpt(
                config,
                vocab_size,
                seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=vpp is None, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=vpp is None, vp_stage=stage
                ),
                spec=pr2_block_spec(config, stage, **pr2_kwargs),
                vp_stage=stage,
            )
        )
    return chunks


def wrap_ddp(config: Any, chunks: List[torch.nn.Module], overlap: bool = False) -> List[Any]:
    """Megatron DistributedDataParallel around every chunk (fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=False
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def gpt_microbatches(num: int, batch: int, seq: int, vocab: int, seed: int) -> List[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        out.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
                attention_mask=torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None],
            )
        )
    return out


def gpt_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = next(data_iterator)
    loss = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )

    def loss_func(output_tensor: torch.Tensor):
        mean = output_tensor.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches.
        return mean, {"lm loss": mean.detach().clone()}

    return loss, loss_func


def run_schedule(
    chunks: List[Any], data: List[dict], seq: int, batch: int, forward_only: bool
) -> List[float]:
    """Megatron's forward_backward_func of the current parallel state over `data` microbatches;
    returns the per-microbatch losses on the last pipeline stage ([] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(data) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(data),
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=forward_only,
    )
    return [float(x["lm loss"]) for x in losses]
