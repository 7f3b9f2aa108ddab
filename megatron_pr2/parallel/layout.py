# Token layouts: which canonical tokens each rank's routers see, in router-row order.
#
# A canonical RouteBatch holds indices [T, L, k]: T = B * S tokens in batch-major order (token
# b * S + s; packed THD: position in the packed row, B = 1). A rank's routers see rows in *their*
# order:
#
#   router rows   the layer input [S_local, B, H] flattened sequence-major: row s_l * B + b.
#   CP (sbhd)     the sequence is cut into 2 * cp chunks; CP rank r holds chunks r and
#                 2 * cp - 1 - r, concatenated (megatron.core.utils.get_batch_on_this_cp_rank).
#   CP (thd)      every packed sequence (padded offsets when given) is cut the same way and the
#                 rank's pieces are concatenated in sequence order (TE thd_get_partitioned_indices).
#   SP            after embedding, scatter_to_sequence_parallel_region keeps the tp_rank-th
#                 contiguous chunk of dim 0 of the CP-local sequence ([S/(cp*tp), B, H]).
#   no SP         every TP rank routes all CP-local tokens (identical routes on TP peers).
#
# TokenLayout.token_index [T_local] is the canonical token of each router row.

from typing import Optional, Sequence, Union

import torch

from megatron_pr2.identity import LayoutIdentity, packing_fingerprint
from megatron_pr2.routes import TokenLayout

IntSeq = Union[torch.Tensor, Sequence[int]]


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
        TokenLayout(token_index [T_local], num_tokens=B * S, seq_length=S, identity): the
        identity records the split (and packing) the layout was made for.
    """
    if batch_size < 1 or seq_length < 1:
        raise ValueError(
            f"layout_for_rank: batch_size={batch_size}, seq_length={seq_length} must be >= 1"
        )
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"layout_for_rank: tp_rank={tp_rank} not in [0, tp_size={tp_size})")
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"layout_for_rank: cp_rank={cp_rank} not in [0, cp_size={cp_size})")

    identity = LayoutIdentity(
        tp_rank=tp_rank,
        tp_size=tp_size,
        sequence_parallel=sequence_parallel,
        cp_rank=cp_rank,
        cp_size=cp_size,
        zigzag=cp_size > 1,
        packing=packing_fingerprint(cu_seqlens, cu_seqlens_padded),
    )
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
            _sp_slice(positions, tp_rank, tp_size, sequence_parallel), packed, seq_length, identity
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
    return TokenLayout(token_index, batch_size * seq_length, seq_length, identity)
