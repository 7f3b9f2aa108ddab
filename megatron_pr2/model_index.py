# Where the PR2 routers of a model are, and what this rank's routers route.
#
#   pr2_routers(model)                 every PR2Router of a model or of a list of model chunks
#   pr2_moe_layers(model)              id(router) -> the MoE layer holding it (its dispatcher)
#   local_layer_ids(model)             global MoE-layer ids of this rank's (virtual) stages
#   local_layout(model, B, S, ...)     canonical token of every router row on this rank, from the
#                                      routers' own process groups (TP rank, SP flag, CP rank)
#   model_group(model, name)           a process group of the model's pg_collection ("pp",
#                                      "tp_dp_cp"), else parallel_state's; also for dense stages
#   has_moe_layer(model)               whether any module is an MoE layer (PR2 or stock)
#
# Shapes: a TokenLayout's token_index is [T_local] (parallel/layout.py).

import weakref
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_pr2.parallel.layout import IntSeq, layout_for_rank
from megatron_pr2.router import PR2Router
from megatron_pr2.routes import TokenLayout

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


@dataclass
class _ChunkIndex:
    """The PR2 routers of one model chunk, and the MoE layer holding each (by id(router))."""

    routers: List[PR2Router]
    moe_layers: Dict[int, torch.nn.Module]
    pg_collections: List[Any]  # distinct Megatron ProcessGroupCollections held by modules
    any_moe_layer: bool  # some module is an MoE layer (a router and a token dispatcher)


_INDEX_OF_CHUNK: "weakref.WeakKeyDictionary[torch.nn.Module, _ChunkIndex]" = (
    weakref.WeakKeyDictionary()
)


def _chunk_indices(model: Model) -> List[_ChunkIndex]:
    """One module walk per chunk, cached (a weak reference, so nothing outlives the model):
    walking a 100B model's modules on every routing() entry costs milliseconds."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    indices = []
    for chunk in chunks:
        index = _INDEX_OF_CHUNK.get(chunk)
        if index is None:
            modules = list(chunk.modules())
            index = _ChunkIndex(
                routers=[m for m in modules if isinstance(m, PR2Router)],
                moe_layers={
                    id(m.router): m
                    for m in modules
                    # An MoELayer (or subclass) by its parts: importing the class here would pull
                    # the dispatchers into `import megatron_pr2`.
                    if isinstance(getattr(m, "router", None), PR2Router)
                    and hasattr(m, "token_dispatcher")
                },
                pg_collections=list(
                    {
                        id(m.pg_collection): m.pg_collection
                        for m in modules
                        if hasattr(m, "pg_collection")
                    }.values()
                ),
                any_moe_layer=any(
                    hasattr(m, "router") and hasattr(m, "token_dispatcher") for m in modules
                ),
            )
            _INDEX_OF_CHUNK[chunk] = index
        indices.append(index)
    return indices


def pr2_routers(model: Model) -> List[PR2Router]:
    """All PR2 routers of a model or a list of model chunks (virtual pipeline stages)."""
    return [router for index in _chunk_indices(model) for router in index.routers]


def pr2_moe_layers(model: Model) -> Dict[int, torch.nn.Module]:
    """id(router) -> the MoE layer holding that PR2 router (routers outside one are absent)."""
    return {k: v for index in _chunk_indices(model) for k, v in index.moe_layers.items()}


def has_moe_layer(model: Model) -> bool:
    """True if a module of the model is an MoE layer (PR2 or stock router)."""
    return any(index.any_moe_layer for index in _chunk_indices(model))


def model_group(model: Model, name: str) -> Optional[Any]:
    """Process group `name` ("pp" or "tp_dp_cp") of the model's Megatron pg_collection, else of
    megatron.core.parallel_state (when initialised), else None. Works for a pipeline stage with
    no MoE layer too (its GPTModel holds the collection)."""
    for index in _chunk_indices(model):
        for collection in index.pg_collections:
            group = getattr(collection, name, None)
            if group is not None:
                return group
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if name == "pp":
        return parallel_state.get_pipeline_model_parallel_group()
    assert name == "tp_dp_cp", name
    return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def model_stage(model: Model) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(pp_rank, pp_size, vp_size) of this rank's model, None where unknown (no pipeline group
    and no initialised parallel state); vp_size is the number of model chunks when > 1."""
    chunks = len(model) if isinstance(model, (list, tuple)) else 1
    vp_size = chunks if chunks > 1 else None
    pp = model_group(model, "pp")
    if pp is None or not torch.distributed.is_initialized():
        return None, None, vp_size
    return pp.rank(), pp.size(), vp_size


def local_layer_ids(model: Model) -> List[int]:
    """Sorted global MoE-layer ids of this rank's routers: the layers a route shard needs."""
    return sorted(r.moe_layer_id for r in pr2_routers(model))


def router_layout(
    router: PR2Router,
    batch_size: int,
    seq_length: int,
    cu_seqlens: Optional[IntSeq] = None,
    cu_seqlens_padded: Optional[IntSeq] = None,
) -> TokenLayout:
    """The canonical tokens `router` routes, from its process groups and sequence-parallel flag."""
    return layout_for_rank(
        batch_size,
        seq_length,
        tp_rank=router.tp_group.rank(),
        tp_size=router.tp_group.size(),
        sequence_parallel=router.config.sequence_parallel,
        cp_rank=router.cp_group.rank(),
        cp_size=router.cp_group.size(),
        cu_seqlens=cu_seqlens,
        cu_seqlens_padded=cu_seqlens_padded,
    )


def local_layout(
    model: Model,
    batch_size: int,
    seq_length: int,
    *,
    cu_seqlens: Optional[IntSeq] = None,
    cu_seqlens_padded: Optional[IntSeq] = None,
) -> TokenLayout:
    """Canonical token of every router row on this rank for a microbatch of `batch_size`
    sequences of `seq_length` tokens (packed THD: pass cu_seqlens / cu_seqlens_padded).

    Taken from the model's own process groups (TP / CP rank and size, sequence parallelism), so
    it is the layout routing() replays against; pass it to scatter_routes / shard_routes."""
    routers = pr2_routers(model)
    if not routers:
        raise ValueError("local_layout: the model has no PR2 routers (build it with apply_pr2)")
    layout = router_layout(routers[0], batch_size, seq_length, cu_seqlens, cu_seqlens_padded)
    return replace(layout, identity=layout.identity.with_stage(*model_stage(model)))
