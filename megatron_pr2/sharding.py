# Canonical <-> per-rank routes (DESIGN.md section 3).
#
# A canonical RouteBatch holds indices [T, L, k]: T = B * S tokens in batch-major order (token
# b * S + s; packed THD: position in the packed row, B = 1) and L global MoE layers. A rank's
# routers need rows in *their* order and only their MoE layers:
#
#   router rows   the layer input [S_local, B, H] flattened sequence-major: row s_l * B + b.
#   CP (sbhd)     the sequence is cut into 2 * cp chunks; CP rank r holds chunks r and
#                 2 * cp - 1 - r, concatenated (megatron.core.utils.get_batch_on_this_cp_rank).
#   CP (thd)      every packed sequence (padded offsets when given) is cut the same way and the
#                 rank's pieces are concatenated in sequence order (TE thd_get_partitioned_indices).
#   SP            after embedding, scatter_to_sequence_parallel_region keeps the tp_rank-th
#                 contiguous chunk of dim 0 of the CP-local sequence ([S/(cp*tp), B, H]).
#   no SP         every TP rank routes all CP-local tokens (identical routes on TP peers).
#   PP / VPP      a (virtual) stage holds the MoE layers among its transformer layers
#                 (get_transformer_layer_offset / get_num_layers_to_build or the custom layout).
#
# TokenLayout.token_index [T_local] is the canonical token of each router row; moe_layer_ids
# gives the stage's global MoE-layer ids. shard_routes slices (bit-exact); scatter_routes sends
# every rank only its own packed slice; gather_routes rebuilds the canonical batch.

import copy
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_pr2.collectives import comm_device, raise_on_any_rank
from megatron_pr2.routes import (
    PredictorCache,
    RouteBatch,
    TokenLayout,
    bits_for,
    pack_bits,
    unpack_bits,
)

__all__ = [
    "layout_for_rank",
    "thd_partitioned_indices",
    "moe_layer_pattern",
    "moe_layer_ids",
    "global_moe_layer_id",
    "shard_routes",
    "check_shard",
    "scatter_routes",
    "gather_routes",
]

IntSeq = Union[torch.Tensor, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Token layouts
# ---------------------------------------------------------------------------------------------
def _as_offsets(name: str, value: IntSeq) -> torch.Tensor:
    offsets = torch.as_tensor(value).to("cpu", torch.int64).reshape(-1)
    if offsets.numel() < 2 or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(
            f"{name}={offsets.tolist()} must start at 0 and not decrease (>= 2 entries)"
        )
    return offsets


def thd_partitioned_indices(cu_seqlens: IntSeq, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Packed-row positions a CP rank holds for THD input, in the rank's local order.

    Same result as Transformer Engine's `thd_get_partitioned_indices(cu_seqlens, total, cp_size,
    cp_rank)` (Megatron's THD + CP path): each sequence [cu[i], cu[i+1]) of length divisible by
    2 * cp_size is cut into 2 * cp_size chunks; the rank keeps chunks cp_rank and
    2 * cp_size - 1 - cp_rank of every sequence, sequences in order.
    """
    cu = _as_offsets("cu_seqlens", cu_seqlens)
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % (2 * cp_size) != 0).any()):
        bad = int(torch.nonzero(lengths % (2 * cp_size) != 0)[0])
        raise ValueError(
            f"THD context parallel needs every (padded) sequence length divisible by "
            f"2 * cp_size={2 * cp_size}; sequence {bad} has length {int(lengths[bad])} "
            f"(pad it and pass cu_seqlens_padded)"
        )
    half = lengths // (2 * cp_size)  # chunk length per sequence
    local_len = 2 * half
    seq_of = torch.repeat_interleave(torch.arange(lengths.numel()), local_len)
    local_start = torch.cumsum(local_len, 0) - local_len
    idx = torch.arange(int(local_len.sum())) - local_start[seq_of]
    h = half[seq_of]
    second = idx >= h
    chunk = torch.where(
        second, torch.full_like(idx, 2 * cp_size - 1 - cp_rank), torch.full_like(idx, cp_rank)
    )
    return cu[:-1][seq_of] + chunk * h + torch.where(second, idx - h, idx)


def _sp_slice(
    positions: torch.Tensor, tp_rank: int, tp_size: int, sequence_parallel: bool
) -> torch.Tensor:
    """scatter_to_sequence_parallel_region: TP rank keeps the tp_rank-th contiguous chunk."""
    if not sequence_parallel or tp_size == 1:
        return positions
    if positions.numel() % tp_size:
        raise ValueError(
            f"layout_for_rank: sequence parallelism needs the CP-local sequence length "
            f"{positions.numel()} divisible by tp_size={tp_size}"
        )
    per_rank = positions.numel() // tp_size
    return positions[tp_rank * per_rank : (tp_rank + 1) * per_rank]


def layout_for_rank(
    batch_size: int,
    seq_length: int,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    cp_rank: int = 0,
    cp_size: int = 1,
    cu_seqlens: Optional[IntSeq] = None,
    cu_seqlens_padded: Optional[IntSeq] = None,
) -> TokenLayout:
    """Canonical token id of every router row on one rank, in the router's row order.

    Args:
        batch_size: B, micro-batch size (packed THD: usually 1; B > 1 means the B rows are
            concatenated into one packed row of B * S tokens, as megatron-core 0.19 does).
        seq_length: S, the full (pre-CP, pre-SP) sequence length; packed THD: the row length.
        tp_rank, tp_size, sequence_parallel: tensor parallelism; only with sequence parallelism
            do TP ranks route different tokens.
        cp_rank, cp_size: context parallelism (zigzag, 2 * cp_size chunks per sequence).
        cu_seqlens: packed THD boundaries [num_seqs + 1] into the packed row; CP zigzags every
            sequence separately (Transformer Engine's thd_get_partitioned_indices, megatron's
            per-document balancing). For 0.19's `use_per_sequence_balancing` (the packed row
            zigzagged as a whole) pass no cu_seqlens: that is the plain sbhd split.
        cu_seqlens_padded: padded THD boundaries; when given, CP partitions by them (as
            Megatron does) and cu_seqlens only has to fit inside them. Canonical token ids are
            positions in the packed row the model sees, i.e. the padded one.

    Returns:
        TokenLayout(token_index [T_local], num_tokens=B * S, seq_length=S).
    """
    if batch_size < 1 or seq_length < 1:
        raise ValueError(
            f"layout_for_rank: batch_size={batch_size}, seq_length={seq_length} must be >= 1"
        )
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"layout_for_rank: tp_rank={tp_rank} not in [0, tp_size={tp_size})")
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"layout_for_rank: cp_rank={cp_rank} not in [0, cp_size={cp_size})")

    thd = cu_seqlens is not None or cu_seqlens_padded is not None
    if thd:
        # The model sees one packed row [1, B * S] (B > 1: the samples' rows concatenated, as
        # megatron-core 0.19's flatten_batch_for_packed_sequences does); cu_seqlens index it, so
        # canonical id b * S + s is the packed position and router rows are [T_local, 1].
        packed = batch_size * seq_length
        bounds = _as_offsets(
            "cu_seqlens_padded" if cu_seqlens_padded is not None else "cu_seqlens",
            cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens,
        )
        if cu_seqlens is not None and cu_seqlens_padded is not None:
            real = _as_offsets("cu_seqlens", cu_seqlens)
            if real.numel() != bounds.numel():
                raise ValueError(
                    f"layout_for_rank: cu_seqlens has {real.numel()} entries, cu_seqlens_padded "
                    f"{bounds.numel()}"
                )
            if bool(((real[1:] - real[:-1]) > (bounds[1:] - bounds[:-1])).any()):
                raise ValueError(
                    "layout_for_rank: a sequence is longer in cu_seqlens than in cu_seqlens_padded"
                )
        if int(bounds[-1]) > packed:
            raise ValueError(
                f"layout_for_rank: THD boundaries end at {int(bounds[-1])} > the packed row of "
                f"batch_size * seq_length={packed} tokens"
            )
        if cp_size > 1:
            if int(bounds[-1]) != packed:
                raise ValueError(
                    f"layout_for_rank: THD with cp_size={cp_size} needs the (padded) boundaries to "
                    f"cover the packed row: cu_seqlens[-1]={int(bounds[-1])} != "
                    f"batch_size * seq_length={packed}"
                )
            positions = thd_partitioned_indices(bounds, cp_size, cp_rank)
        else:
            positions = torch.arange(packed)
        return TokenLayout(
            _sp_slice(positions, tp_rank, tp_size, sequence_parallel), packed, seq_length
        )
    elif cp_size > 1:
        if seq_length % (2 * cp_size):
            raise ValueError(
                f"layout_for_rank: seq_length={seq_length} not divisible by 2 * cp_size={2 * cp_size}"
            )
        chunk = seq_length // (2 * cp_size)
        first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
        last_chunk = 2 * cp_size - 1 - cp_rank
        positions = torch.cat([first, torch.arange(last_chunk * chunk, (last_chunk + 1) * chunk)])
    else:
        positions = torch.arange(seq_length)

    positions = _sp_slice(positions, tp_rank, tp_size, sequence_parallel)
    b = torch.arange(batch_size).unsqueeze(0)
    token_index = (b * seq_length + positions.unsqueeze(1)).reshape(-1)
    return TokenLayout(token_index, batch_size * seq_length, seq_length)


# ---------------------------------------------------------------------------------------------
# MoE layers held by a pipeline (virtual) stage
# ---------------------------------------------------------------------------------------------
def moe_layer_pattern(config: Any) -> List[int]:
    """1/0 per transformer layer (0-based) from config.moe_layer_freq, as Megatron's GPT spec
    builder parses it: an int f means every f-th layer starting at layer 0; a list is the
    pattern itself (dense first layers: [0, 0, 1, 1, ...])."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"moe_layer_freq={freq} must be >= 1")
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if isinstance(freq, (list, tuple)):
        if len(freq) != config.num_layers or any(x not in (0, 1) for x in freq):
            raise ValueError(
                f"moe_layer_freq has {len(freq)} entries {list(freq)}: it must be a 0/1 list of "
                f"num_layers={config.num_layers} entries"
            )
        return [int(x) for x in freq]
    raise ValueError(f"moe_layer_freq={freq!r} must be an int or a list")


def _decoder_layers_of_stage(config: Any, pp_rank: int, vp_stage: Optional[int]) -> range:
    """0-based global transformer-layer numbers built by (pp_rank, vp_stage)."""
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None and not isinstance(layout, (str, list)):
        # PipelineParallelLayerLayout.get_layer_offset reads the *global* virtual-pipeline world
        # size from parallel_state (and forces vp_stage=0 when it is unset), so read the layout
        # table directly: offset = decoders of all earlier (vp, pp) stages, vp-major.
        from megatron.core.transformer.enums import LayerType

        vp = 0 if vp_stage is None else vp_stage
        table = layout.layout
        offset = sum(
            table[p][v].count(LayerType.decoder)
            for v in range(vp + 1)
            for p in range(layout.pipeline_model_parallel_size if v < vp else pp_rank)
        )
        return range(offset, offset + table[pp_rank][vp].count(LayerType.decoder))
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(
        offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    )


def _stage_has_mtp(
    config: Any, pp_rank: int, pp_size: int, vp_stage: Optional[int], vp_size: Optional[int]
) -> bool:
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None and not isinstance(layout, (str, list)):
        from megatron.core.transformer.enums import LayerType

        return layout.layout[pp_rank][0 if vp_stage is None else vp_stage].count(LayerType.mtp) > 0
    last_vp = vp_size is None or vp_stage == vp_size - 1
    return pp_rank == pp_size - 1 and last_vp


def moe_layer_ids(
    config: Any,
    pp_rank: int,
    pp_size: int,
    vp_stage: Optional[int] = None,
    vp_size: Optional[int] = None,
    *,
    include_mtp: bool = False,
) -> torch.Tensor:
    """Global MoE-layer ids (0-based, in model order) held by one pipeline (virtual) stage.

    Args:
        config: the model's TransformerConfig (num_layers, moe_layer_freq, uneven-PP fields,
            pipeline_model_parallel_layout, account_for_*_in_pipeline_split).
        pp_rank, pp_size: pipeline stage and pipeline size (may differ from the config's, e.g.
            to re-shard routes recorded under another layout; not with a custom layout).
        vp_stage, vp_size: virtual pipeline stage and size (interleaved schedule), or None.
        include_mtp: also return the ids of multi-token-prediction layers held by this stage
            (numbered after the decoder's MoE layers, see global_moe_layer_id).

    Returns:
        int64 tensor [L_stage].
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"moe_layer_ids: pp_rank={pp_rank} not in [0, pp_size={pp_size})")
    if vp_size is not None and vp_size > 1:
        if vp_stage is None or not 0 <= vp_stage < vp_size:
            raise ValueError(f"moe_layer_ids: vp_stage={vp_stage} not in [0, vp_size={vp_size})")
    else:
        if vp_stage not in (None, 0):
            raise ValueError(f"moe_layer_ids: vp_stage={vp_stage} given without vp_size > 1")
        vp_size, vp_stage = None, None
    cfg_vp = config.virtual_pipeline_model_parallel_size
    cfg_vp = cfg_vp if cfg_vp is not None and cfg_vp > 1 else None
    if config.pipeline_model_parallel_size != pp_size or cfg_vp != vp_size:
        if getattr(config, "pipeline_model_parallel_layout", None) is not None:
            raise ValueError(
                f"moe_layer_ids: pp_size={pp_size}, vp_size={vp_size} differ from the config's "
                f"custom pipeline_model_parallel_layout ({config.pipeline_model_parallel_size}, "
                f"{cfg_vp})"
            )
        # Shallow copy: TransformerConfig.__post_init__ is not re-run, only the sizes change.
        config = copy.copy(config)
        config.pipeline_model_parallel_size = pp_size
        config.virtual_pipeline_model_parallel_size = vp_size
    pattern = moe_layer_pattern(config)
    moe_id = torch.cumsum(torch.tensor(pattern, dtype=torch.int64), 0) - 1
    layers = [
        layer for layer in _decoder_layers_of_stage(config, pp_rank, vp_stage) if pattern[layer]
    ]
    ids = (
        moe_id[torch.tensor(layers, dtype=torch.int64)]
        if layers
        else torch.empty(0, dtype=torch.int64)
    )
    if include_mtp and (getattr(config, "mtp_num_layers", None) or 0) > 0:
        if _stage_has_mtp(config, pp_rank, pp_size, vp_stage, vp_size):
            first = sum(pattern)
            ids = torch.cat([ids, torch.arange(first, first + config.mtp_num_layers)])
    return ids


def global_moe_layer_id(config: Any, layer_number: int) -> int:
    """Global MoE-layer id (0-based) of Megatron's global 1-based `layer_number`.

    Decoder layers: the rank of the layer among the MoE layers of moe_layer_freq. Multi-token
    prediction layers (layer_number = num_layers + j, j = 1..mtp_num_layers, as Megatron numbers
    the MTP block's transformer layer) follow them: num_moe_decoder_layers + j - 1.
    """
    pattern = moe_layer_pattern(config)
    num_layers = config.num_layers
    mtp = getattr(config, "mtp_num_layers", None) or 0
    if 1 <= layer_number <= num_layers:
        if not pattern[layer_number - 1]:
            raise ValueError(
                f"global_moe_layer_id: layer_number={layer_number} is a dense layer per "
                f"moe_layer_freq={config.moe_layer_freq}"
            )
        return sum(pattern[: layer_number - 1])
    if num_layers < layer_number <= num_layers + mtp:
        return sum(pattern) + layer_number - num_layers - 1
    raise ValueError(
        f"global_moe_layer_id: layer_number={layer_number} outside 1..num_layers + "
        f"mtp_num_layers={num_layers + mtp}"
    )


# ---------------------------------------------------------------------------------------------
# Local slicing
# ---------------------------------------------------------------------------------------------
def _layer_tensor(layer_ids: IntSeq) -> torch.Tensor:
    return torch.as_tensor(layer_ids).to("cpu", torch.int64).reshape(-1)


def _row_tokens(routes: RouteBatch) -> torch.Tensor:
    if routes.token_index is not None:
        return routes.token_index
    return torch.arange(routes.shape[0])


def _row_layers(routes: RouteBatch) -> torch.Tensor:
    if routes.layer_index is not None:
        return routes.layer_index
    return torch.arange(routes.shape[1])


def _slice_cache(
    cache: Optional[PredictorCache], token_index: torch.Tensor, columns: torch.Tensor
) -> Optional[PredictorCache]:
    """Cached tokens of `token_index` (in the cache's own order), layer columns `columns`."""
    if cache is None:
        return None
    keep = torch.isin(cache.token_index.to(torch.int64), token_index)
    return cache.select_tokens(keep).select_layers(columns)


def _slice(
    routes: RouteBatch,
    full_indices: torch.Tensor,
    full_dropped: Optional[torch.Tensor],
    token_index: torch.Tensor,
    layer_ids: torch.Tensor,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[PredictorCache]]:
    rows = routes.rows_for(token_index)
    cols = routes.columns_for(layer_ids)
    indices = full_indices[rows][:, cols]
    dropped = None if full_dropped is None else full_dropped[rows][:, cols]
    return indices, dropped, _slice_cache(routes.cache, token_index, cols)


def _check_request(routes: RouteBatch, num_tokens: int, seq_length: Optional[int]) -> None:
    if routes.num_tokens != num_tokens:
        raise ValueError(
            f"routes hold a microbatch of {routes.num_tokens} tokens; the layout expects "
            f"num_tokens={num_tokens} (batch_size * seq_length)"
        )
    if seq_length is not None and routes.seq_length is not None and routes.seq_length != seq_length:
        raise ValueError(
            f"routes have seq_length={routes.seq_length}; the layout has seq_length={seq_length}"
        )


def shard_routes(routes: RouteBatch, layout: TokenLayout, layer_ids: IntSeq) -> RouteBatch:
    """The slice of `routes` one rank needs: rows in router order, the stage's MoE layers.

    Pure slicing (bit-exact): missing tokens and capacity-drop masks are kept; the predictor
    cache keeps the cached tokens of this layout and the stage's layer columns.
    """
    layer_ids = _layer_tensor(layer_ids)
    _check_request(routes, layout.num_tokens, layout.seq_length)
    indices, dropped, cache = _slice(
        routes, routes.indices, routes.dropped, layout.token_index, layer_ids
    )
    return RouteBatch(
        indices,
        routes.num_experts,
        dropped=dropped,
        token_index=layout.token_index,
        layer_index=layer_ids,
        num_tokens=layout.num_tokens,
        seq_length=layout.seq_length,
        cache=cache,
    )


def check_shard(local: RouteBatch, layout: TokenLayout, layer_ids: IntSeq) -> None:
    """Raise ValueError unless `local` is exactly this rank's shard (tokens and layers)."""
    layer_ids = _layer_tensor(layer_ids)
    if local.shape[0] != layout.token_index.numel():
        raise ValueError(
            f"route shard has {local.shape[0]} tokens; this rank's routers route "
            f"{layout.token_index.numel()} tokens"
        )
    if local.shape[1] != layer_ids.numel():
        raise ValueError(
            f"route shard has {local.shape[1]} MoE layers; this pipeline stage holds "
            f"{layer_ids.numel()} MoE layers {layer_ids.tolist()}"
        )
    if local.num_tokens != layout.num_tokens:
        raise ValueError(
            f"route shard belongs to a microbatch of {local.num_tokens} tokens; the layout has "
            f"{layout.num_tokens}"
        )
    if not torch.equal(_row_tokens(local), layout.token_index):
        raise ValueError(
            "route shard rows are not this rank's tokens in router order (token_index mismatch)"
        )
    if not torch.equal(_row_layers(local), layer_ids):
        raise ValueError(
            f"route shard layers {_row_layers(local).tolist()} != this stage's MoE layers "
            f"{layer_ids.tolist()}"
        )


# ---------------------------------------------------------------------------------------------
# Wire format for point-to-point transfers (one uint8 tensor per message)
# ---------------------------------------------------------------------------------------------
_MAGIC = 0x50523252  # "PR2R"
_FLAG_MISSING, _FLAG_DROPPED, _FLAG_CACHE, _FLAG_TOKENS = 1, 2, 4, 8
_FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HEADER = 16


def encode_token_index(
    token_index: torch.Tensor, num_tokens: int, seq_length: Optional[int]
) -> torch.Tensor:
    """Compact int64 description of a row order: run-length encoded when it has the layout
    structure (rows [s_local, b] -> b * S + positions[s_local]), else the raw ids.

    Layouts of layout_for_rank encode to a handful of runs (1 for SP, 2 for CP zigzag, 2 per
    sequence for THD + CP), so a request costs O(runs) instead of 8 bytes per token.
    """
    token_index = token_index.to("cpu", torch.int64)
    n = token_index.numel()
    if seq_length and num_tokens % seq_length == 0 and n:
        batch = num_tokens // seq_length
        if n % batch == 0:
            grid = token_index.view(-1, batch)
            positions = grid[:, 0]
            expected = positions.unsqueeze(1) + torch.arange(batch) * seq_length
            if bool((positions < seq_length).all()) and torch.equal(grid, expected):
                starts = torch.ones(positions.numel(), dtype=torch.bool)
                starts[1:] = positions[1:] != positions[:-1] + 1
                begin = torch.nonzero(starts).squeeze(1)
                lengths = torch.diff(torch.cat([begin, torch.tensor([positions.numel()])]))
                runs = torch.stack([positions[begin], lengths], dim=1).reshape(-1)
                return torch.cat([torch.tensor([1, batch, seq_length, begin.numel()]), runs])
    return torch.cat([torch.tensor([0, n]), token_index])


def decode_token_index(code: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_token_index."""
    if int(code[0]) == 0:
        return code[2 : 2 + int(code[1])].clone()
    batch, seq_length, nruns = (int(x) for x in code[1:4])
    runs = code[4 : 4 + 2 * nruns].view(nruns, 2)
    positions = (
        torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in runs.tolist()])
        if nruns
        else torch.empty(0, dtype=torch.int64)
    )
    return (positions.unsqueeze(1) + torch.arange(batch) * seq_length).reshape(-1)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _encode(
    indices: torch.Tensor,
    num_experts: int,
    dropped: Optional[torch.Tensor],
    cache: Optional[PredictorCache],
    num_tokens: int,
    seq_length: Optional[int],
    token_index: Optional[torch.Tensor] = None,
    layer_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Serialize a route shard: header, [token code, layer ids], packed ids, masks, cache."""
    T, L, k = indices.shape
    missing = indices[..., 0] < 0
    flags = 0
    parts: List[torch.Tensor] = []
    extra: List[torch.Tensor] = []
    if token_index is not None:
        flags |= _FLAG_TOKENS
        code = encode_token_index(token_index, num_tokens, seq_length)
        extra = [code, layer_index.to(torch.int64)]
    parts.append(pack_bits(indices.clamp(min=0), bits_for(num_experts)))
    if bool(missing.any()):
        flags |= _FLAG_MISSING
        parts.append(pack_bits(missing, 1))
    if dropped is not None:
        flags |= _FLAG_DROPPED
        parts.append(pack_bits(dropped, 1))
    cache_meta = [0, 0, 0, 0, 0]
    if cache is not None:
        flags |= _FLAG_CACHE
        C, _, H = cache.hidden.shape
        cache_meta = [
            C,
            H,
            cache.logits.shape[-1],
            _FLOAT_DTYPES.index(cache.hidden.dtype),
            _FLOAT_DTYPES.index(cache.logits.dtype),
        ]
        parts += [
            _bytes(cache.token_index.to(torch.int64)),
            _bytes(cache.hidden),
            _bytes(cache.logits),
        ]
    header = torch.tensor(
        [_MAGIC, T, L, k, num_experts, num_tokens, -1 if seq_length is None else seq_length, flags]
        + [extra[0].numel() if extra else 0]
        + cache_meta
        + [0, 0],
        dtype=torch.int64,
    )
    assert header.numel() == _HEADER
    return torch.cat([_bytes(header)] + [_bytes(x) for x in extra] + [_bytes(p) for p in parts])


def _decode(payload: torch.Tensor) -> dict:
    """Inverse of _encode: dict with indices [T, L, k] int64 (-1 missing), dropped, cache, ..."""
    payload = payload.to("cpu")
    if payload.numel() < 8 * _HEADER:
        raise ValueError("route transfer: truncated message")
    header = payload[: 8 * _HEADER].clone().view(torch.int64)
    if int(header[0]) != _MAGIC:
        raise ValueError("route transfer: corrupt message (bad magic)")
    T, L, k, E, num_tokens, seq_length, flags, code_len = (int(x) for x in header[1:9])
    C, H, EL, hd, ld = (int(x) for x in header[9:14])
    pos = 8 * _HEADER

    def take(nbytes: int) -> torch.Tensor:
        nonlocal pos
        # clone: a fresh storage at offset 0, so .view(int64 / float) is aligned.
        out = payload[pos : pos + nbytes].clone()
        if out.numel() != nbytes:
            raise ValueError("route transfer: truncated message")
        pos += nbytes
        return out

    out = {
        "num_experts": E,
        "num_tokens": num_tokens,
        "seq_length": None if seq_length < 0 else seq_length,
    }
    if flags & _FLAG_TOKENS:
        out["token_index"] = decode_token_index(take(8 * code_len).view(torch.int64))
        out["layer_index"] = take(8 * L).view(torch.int64).clone()
    count = T * L * k
    bits = bits_for(E)
    indices = unpack_bits(take((count * bits + 7) // 8), bits, count).view(T, L, k)
    if flags & _FLAG_MISSING:
        missing = unpack_bits(take((T * L + 7) // 8), 1, T * L).view(T, L).bool()
        indices = indices.masked_fill(missing.unsqueeze(-1), -1)
    out["indices"] = indices
    out["dropped"] = None
    if flags & _FLAG_DROPPED:
        out["dropped"] = unpack_bits(take((count + 7) // 8), 1, count).view(T, L, k).bool()
    out["cache"] = None
    if flags & _FLAG_CACHE:
        hdt, ldt = _FLOAT_DTYPES[hd], _FLOAT_DTYPES[ld]
        tok = take(8 * C).view(torch.int64).clone()
        hidden = take(C * L * H * hdt.itemsize).view(hdt).view(C, L, H).clone()
        logits = take(C * L * EL * ldt.itemsize).view(ldt).view(C, L, EL).clone()
        out["cache"] = PredictorCache(tok, hidden, logits)
    assert pos == payload.numel(), "route transfer: trailing bytes"
    return out


def _send(payload: torch.Tensor, dst: int, group: Any, device: torch.device) -> None:
    dist.send(
        torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst=dst, group=group
    )
    if payload.numel() > 0:
        dist.send(payload.to(device), dst=dst, group=group)


def _recv(src: int, group: Any, device: torch.device) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, group=group)
    n = int(size.item())
    assert n > 0, f"route transfer: unexpected message size {n}"
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    dist.recv(buf, src=src, group=group)
    return buf.cpu()


def _recv_size(src: int, group: Any, device: torch.device) -> int:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, group=group)
    return int(size.item())


def _group_info(group: Any) -> Tuple[Any, int, int]:
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _global(group: Any, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not dist.group.WORLD else group_rank


# ---------------------------------------------------------------------------------------------
# Scatter / gather
# ---------------------------------------------------------------------------------------------
def scatter_routes(
    routes: Optional[RouteBatch],
    layout: TokenLayout,
    layer_ids: IntSeq,
    group: Any = None,
    src: int = 0,
) -> RouteBatch:
    """_scatter_routes, then every rank of the group raises if any rank failed."""
    group, rank, _ = _group_info(group)
    error: Optional[ValueError] = None
    local = None
    try:
        local = _scatter_routes(routes, layout, layer_ids, group, src)
    except ValueError as exc:
        error = exc
    raise_on_any_rank(
        error,
        group,
        f"scatter_routes: another rank of the group could not get its route shard (see its "
        f"error); rank {rank} stops too",
    )
    return local


def _scatter_routes(
    routes: Optional[RouteBatch],
    layout: TokenLayout,
    layer_ids: IntSeq,
    group: Any = None,
    src: int = 0,
) -> RouteBatch:
    """Give every rank of `group` its own route shard from the canonical batch on `src`.

    `src` is a rank *within* `group`; only it needs `routes` (others pass None). Protocol
    (point-to-point, CPU tensors on gloo, device tensors on NCCL):
      1. each rank != src sends src its request: header [num_tokens, seq_length, L_local,
         code_len] + the run-length token code (encode_token_index) + its layer ids
         (8 * (4 + code_len + L_local) bytes; code_len is 4 + 2 * runs for layout_for_rank
         layouts);
      2. src decodes the canonical routes once, slices each request and sends each rank ONLY
         its packed slice.
    Bytes received per rank: 8 (size) + 128 (header) + ceil(T_r * L_r * k * ceil(log2 E) / 8)
    [+ ceil(T_r * L_r / 8) if it has missing tokens] [+ ceil(T_r * L_r * k / 8) with capacity-drop
    masks] [+ cache: 8 * C_r + C_r * L_r * (H + E) * itemsize]. Routes are never broadcast.
    An invalid request fails loudly on src and on the requesting rank (no hang).
    """
    layer_ids = _layer_tensor(layer_ids)
    group, rank, world = _group_info(group)
    if not 0 <= src < world:
        raise ValueError(f"scatter_routes: src={src} not a rank of the group (size {world})")
    device = comm_device(group)
    if rank != src:
        code = encode_token_index(layout.token_index, layout.num_tokens, layout.seq_length)
        request = torch.cat(
            [
                torch.tensor(
                    [layout.num_tokens, layout.seq_length or -1, layer_ids.numel(), code.numel()]
                ),
                code,
                layer_ids,
            ]
        )
        _send(_bytes(request), _global(group, src), group, device)
        size = _recv_size(_global(group, src), group, device)
        if size < 0:
            raise ValueError(
                f"scatter_routes: source rank {src} could not serve rank {rank}'s request "
                f"({layout.token_index.numel()} tokens, MoE layers {layer_ids.tolist()}); see the "
                f"source rank's error"
            )
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        dist.recv(buf, src=_global(group, src), group=group)
        parts = _decode(buf.cpu())
        local = RouteBatch(
            parts["indices"],
            parts["num_experts"],
            dropped=parts["dropped"],
            token_index=layout.token_index,
            layer_index=layer_ids,
            num_tokens=parts["num_tokens"],
            seq_length=layout.seq_length,
            cache=parts["cache"],
        )
        check_shard(local, layout, layer_ids)
        return local

    if routes is None:
        # Still answer every request so that peers fail instead of hanging.
        error: Optional[Exception] = ValueError(
            f"scatter_routes: src rank {src} was given routes=None"
        )
    else:
        error = None
    full_indices = routes.indices if routes is not None else None
    full_dropped = routes.dropped if routes is not None else None
    for peer in range(world):
        if peer == src:
            continue
        request = _recv(_global(group, peer), group, device).view(torch.int64)
        num_tokens, seq_length, num_layers, code_len = (int(x) for x in request[:4])
        code = request[4 : 4 + code_len]
        peer_layers = request[4 + code_len : 4 + code_len + num_layers]
        try:
            if routes is None:
                raise error
            _check_request(routes, num_tokens, None if seq_length < 0 else seq_length)
            indices, dropped, cache = _slice(
                routes, full_indices, full_dropped, decode_token_index(code), peer_layers
            )
            payload = _encode(
                indices,
                routes.num_experts,
                dropped,
                cache,
                num_tokens,
                None if seq_length < 0 else seq_length,
            )
        except ValueError as exc:
            error = error or ValueError(f"scatter_routes: request of rank {peer}: {exc}")
            dist.send(
                torch.tensor([-1], dtype=torch.int64, device=device),
                dst=_global(group, peer),
                group=group,
            )
            continue
        _send(payload, _global(group, peer), group, device)
    if error is not None:
        raise error
    local = shard_routes(routes, layout, layer_ids)
    return local


def gather_routes(local: RouteBatch, group: Any = None, dst: int = 0) -> Optional[RouteBatch]:
    """Assemble the canonical RouteBatch on `dst` (a rank within `group`) from every rank's shard.

    Shards may cover different token subsets (SP / CP) and layer subsets (PP / VPP stages);
    tokens routed by several ranks (TP peers without sequence parallelism, or data duplicated
    on purpose) must agree exactly (indices, missing and drop masks, cache), else ValueError.
    Every (token, layer) of the union of layers must be covered by some rank. The cache is
    assembled the same way when shards carry one. Returns None on ranks other than dst.
    """
    group, rank, world = _group_info(group)
    if not 0 <= dst < world:
        raise ValueError(f"gather_routes: dst={dst} not a rank of the group (size {world})")
    device = comm_device(group)
    payload = _encode(
        local.indices,
        local.num_experts,
        local.dropped,
        local.cache,
        local.num_tokens,
        local.seq_length,
        token_index=_row_tokens(local),
        layer_index=_row_layers(local),
    )
    if rank != dst:
        _send(payload, _global(group, dst), group, device)
        return None
    shards = []
    for peer in range(world):
        shards.append(
            _decode(payload) if peer == dst else _decode(_recv(_global(group, peer), group, device))
        )
    return assemble_routes(shards)


def assemble_routes(shards: List[dict]) -> RouteBatch:
    """Merge decoded shards (dicts with indices, token_index, layer_index, dropped, cache, ...)
    into one canonical RouteBatch; see gather_routes for the rules."""
    first = shards[0]
    num_tokens, num_experts = first["num_tokens"], first["num_experts"]
    topk = first["indices"].shape[2]
    for r, s in enumerate(shards):
        if s["num_tokens"] != num_tokens:
            raise ValueError(
                f"gather_routes: rank {r} has a microbatch of {s['num_tokens']} tokens, rank 0 {num_tokens}"
            )
        if s["num_experts"] != num_experts:
            raise ValueError(
                f"gather_routes: rank {r} has num_experts={s['num_experts']}, rank 0 {num_experts}"
            )
        if s["indices"].shape[2] != topk:
            raise ValueError(
                f"gather_routes: rank {r} has k={s['indices'].shape[2]}, rank 0 k={topk}"
            )
        if s["token_index"].numel() != s["indices"].shape[0]:
            raise ValueError(
                f"gather_routes: rank {r} sent {s['indices'].shape[0]} token rows for "
                f"{s['token_index'].numel()} token ids"
            )
        if s["token_index"].numel() and (
            int(s["token_index"].min()) < 0 or int(s["token_index"].max()) >= num_tokens
        ):
            raise ValueError(f"gather_routes: rank {r} sent token ids outside 0..{num_tokens - 1}")
    layers = torch.unique(torch.cat([s["layer_index"] for s in shards]))  # sorted
    column = {int(layer): c for c, layer in enumerate(layers.tolist())}
    L = layers.numel()
    indices = torch.full((num_tokens, L, topk), -1, dtype=torch.int64)
    covered = torch.zeros(num_tokens, L, dtype=torch.bool)
    any_dropped = any(s["dropped"] is not None for s in shards)
    dropped = torch.zeros(num_tokens, L, topk, dtype=torch.bool) if any_dropped else None
    for r, s in enumerate(shards):
        rows = s["token_index"]
        cols = torch.tensor([column[int(x)] for x in s["layer_index"].tolist()], dtype=torch.int64)
        grid = (rows.unsqueeze(1), cols.unsqueeze(0))
        seen = covered[grid]
        mine_dropped = (
            s["dropped"]
            if s["dropped"] is not None
            else torch.zeros_like(s["indices"], dtype=torch.bool)
        )
        if bool(seen.any()):
            same = (indices[grid] == s["indices"]).all(-1)
            if dropped is not None:
                same &= (dropped[grid] == mine_dropped).all(-1)
            bad = seen & ~same
            if bool(bad.any()):
                t, c = (int(x) for x in torch.nonzero(bad)[0])
                raise ValueError(
                    f"gather_routes: rank {r} disagrees with an earlier rank on {int(bad.sum())} "
                    f"(token, layer) routes, e.g. token {int(rows[t])}, MoE layer "
                    f"{int(s['layer_index'][c])}: TP ranks without sequence parallelism must "
                    f"route identically"
                )
        indices[grid] = s["indices"]
        if dropped is not None:
            dropped[grid] = mine_dropped
        covered[grid] = True
    if not bool(covered.all()):
        t, c = (int(x) for x in torch.nonzero(~covered)[0])
        raise ValueError(
            f"gather_routes: {int((~covered).sum())} (token, layer) routes were sent by no rank, "
            f"e.g. token {t}, MoE layer {int(layers[c])}"
        )
    cache = _assemble_cache(shards, layers, column, num_tokens)
    canonical_layers = torch.equal(layers, torch.arange(L))
    return RouteBatch(
        indices,
        num_experts,
        dropped=dropped,
        layer_index=None if canonical_layers else layers,
        num_tokens=num_tokens,
        seq_length=first["seq_length"],
        cache=cache,
    )


def _assemble_cache(
    shards: List[dict], layers: torch.Tensor, column: dict, num_tokens: int
) -> Optional[PredictorCache]:
    with_cache = [(r, s) for r, s in enumerate(shards) if s["cache"] is not None]
    if not with_cache:
        return None
    if len(with_cache) != len(shards):
        missing = [r for r, s in enumerate(shards) if s["cache"] is None]
        raise ValueError(f"gather_routes: ranks {missing} sent no predictor cache while others did")
    tokens = torch.unique(
        torch.cat([s["cache"].token_index.to(torch.int64) for _, s in with_cache])
    )
    slot = torch.full((num_tokens,), -1, dtype=torch.int64)
    slot[tokens] = torch.arange(tokens.numel())
    ref = with_cache[0][1]["cache"]
    C, L = tokens.numel(), layers.numel()
    hidden = torch.zeros(C, L, ref.hidden.shape[-1], dtype=ref.hidden.dtype)
    logits = torch.zeros(C, L, ref.logits.shape[-1], dtype=ref.logits.dtype)
    covered = torch.zeros(C, L, dtype=torch.bool)
    for r, s in with_cache:
        cache = s["cache"]
        if cache.hidden.shape[-1] != hidden.shape[-1] or cache.hidden.dtype != hidden.dtype:
            raise ValueError(
                f"gather_routes: rank {r} cache hidden {tuple(cache.hidden.shape)} {cache.hidden.dtype} differs from rank 0"
            )
        rows = slot[cache.token_index.to(torch.int64)]
        cols = torch.tensor([column[int(x)] for x in s["layer_index"].tolist()], dtype=torch.int64)
        grid = (rows.unsqueeze(1), cols.unsqueeze(0))
        seen = covered[grid]
        if bool(seen.any()):
            same = (hidden[grid] == cache.hidden).all(-1) & (logits[grid] == cache.logits).all(-1)
            if bool((seen & ~same).any()):
                raise ValueError(
                    f"gather_routes: rank {r} predictor cache disagrees with an earlier rank on "
                    f"{int((seen & ~same).sum())} (token, layer) entries"
                )
        hidden[grid] = cache.hidden
        logits[grid] = cache.logits
        covered[grid] = True
    if not bool(covered.all()):
        raise ValueError(
            f"gather_routes: predictor cache incomplete: {int((~covered).sum())} (cached token, layer) "
            f"entries were sent by no rank"
        )
    return PredictorCache(tokens, hidden, logits)
