# Per-sequence engine routes <-> one canonical RouteBatch, with every check in one place.
#
# Engine side, per sequence b: an array [n_b, C, k] whose row i is the route of position
# start_b + i of the sequence (C = every transformer layer with an EngineLayout, else MoE layers
# only). Engines route every token they feed: prompt and generated tokens except the last one,
# from an optional start offset (vLLM routed_experts_prompt_start, SGLang
# routed_experts_start_len).
# Canonical side (routes.RouteBatch): indices [B * S, L_moe, k], position s of sequence b at row
# b * S + s (S = seq_length), or at row cu_seqlens[b] + s of one packed stream of
# packed_rows * S tokens (THD). Positions no engine row covers are *missing* (-1): replay fails
# loudly if a router is asked for one, unless the replay policy fills them.
#
# routes_from_engine / routes_to_engine are the generic entry points (already decoded arrays or
# flat base64 with a given shape); engines/adapters.py builds the engine-specific ones on them.

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_pr2.engines.layout import EngineLayout
from megatron_pr2.engines.wire import (
    decode_array,
    decode_flat_base64,
    encode_flat_base64,
    wire_dtype,
)
from megatron_pr2.routes import RouteBatch

__all__ = ["EngineSequence", "place", "extract", "routes_from_engine", "routes_to_engine"]

Offsets = Optional[Union[torch.Tensor, Sequence[int]]]


@dataclass
class EngineSequence:
    """One decoded engine sequence before placement."""

    routes: np.ndarray
    """[n, C, k] int64 expert ids as the engine sent them (C: engine layers or MoE layers)."""
    wire: np.dtype
    """The dtype they travelled in (bounds the representable ids)."""
    start: int
    """Position within the sequence of row 0 (the engine's start offset)."""
    label: str
    """How errors name it ("sequence 2", "choice 0 of request 1")."""


def _row_offsets(
    caller: str, count: int, seq_length: int, cu_seqlens: Offsets, packed_rows: int
) -> Tuple[List[int], List[int], int]:
    """(first canonical row, row capacity) of each sequence, and the total row count."""
    if seq_length < 1:
        raise ValueError(f"{caller}: seq_length={seq_length} must be >= 1")
    if cu_seqlens is None:
        return [b * seq_length for b in range(count)], [seq_length] * count, count * seq_length
    starts = torch.as_tensor(cu_seqlens, dtype=torch.int64).reshape(-1)
    if starts.numel() != count + 1:
        raise ValueError(
            f"{caller}: cu_seqlens entries expected {count + 1} for {count} sequences, given "
            f"{starts.numel()}"
        )
    if int(starts[0]) != 0 or bool((starts[1:] < starts[:-1]).any()):
        raise ValueError(f"{caller}: cu_seqlens={starts.tolist()} must start at 0 and not decrease")
    if packed_rows < 1:
        raise ValueError(f"{caller}: packed_rows={packed_rows} must be >= 1")
    total = packed_rows * seq_length
    if int(starts[-1]) > total:
        raise ValueError(
            f"{caller}: cu_seqlens[-1] expected <= packed_rows * seq_length = {total}, given "
            f"{int(starts[-1])}"
        )
    return starts[:-1].tolist(), (starts[1:] - starts[:-1]).tolist(), total


def _expert_maps(caller: str, expert_map: Any, layout: Optional[EngineLayout], num_moe: int):
    """physical -> logical expert map as [num_moe, P] int64, from [P] or [layers, P]."""
    if expert_map is None:
        return None
    maps, _ = decode_array(expert_map, f"{caller}: expert_map")
    if maps.ndim == 1:
        return np.broadcast_to(maps, (num_moe, maps.shape[0]))
    if maps.ndim == 2 and maps.shape[0] == num_moe:
        return maps
    if maps.ndim == 2 and layout is not None and maps.shape[0] == layout.num_layers:
        return maps[list(layout.moe_layers)]
    raise ValueError(
        f"{caller}: expert_map shape expected [physical] or [layers, physical] with layers = "
        f"{num_moe} MoE layers"
        + (f" or {layout.num_layers} layers" if layout else "")
        + f", given {tuple(maps.shape)}"
    )


def _check_routes(
    where: str, array: np.ndarray, valid: np.ndarray, num_experts: int, start: int, maps: Any
) -> np.ndarray:
    """Map physical ids, then check id range and distinct experts per (token, layer)."""
    if maps is not None:
        physical = maps.shape[1]
        bad = valid & ((array < 0) | (array >= physical))
        if bad.any():
            t, layer, slot = np.argwhere(bad)[0]
            raise ValueError(
                f"{where}, position {start + t}, MoE layer {layer}: physical expert id expected "
                f"in [0, {physical}) (expert_map width), given {int(array[t, layer, slot])}"
            )
        columns = np.arange(array.shape[1])[None, :, None]
        array = np.where(valid, maps[columns, np.clip(array, 0, physical - 1)], array)
    bad = valid & ((array < 0) | (array >= num_experts))
    if bad.any():
        t, layer, slot = np.argwhere(bad)[0]
        value = int(array[t, layer, slot])
        hint = (
            " (physical expert ids of an EPLB deployment? pass expert_map=physical_to_logical)"
            if value >= num_experts and maps is None
            else ""
        )
        raise ValueError(
            f"{where}, position {start + t}, MoE layer {layer}: expert id expected in "
            f"[0, {num_experts}), given {value}{hint}"
        )
    if array.shape[2] > 1 and array.size:
        ordered = np.sort(np.where(valid, array, -1), axis=-1)
        dup = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(axis=-1)
        if dup.any():
            t, layer = np.argwhere(dup)[0]
            raise ValueError(
                f"{where}, position {start + t}, MoE layer {layer}: top-k experts expected "
                f"distinct, given {array[t, layer].tolist()}"
            )
    return array


def place(
    caller: str,
    sequences: Sequence[EngineSequence],
    seq_length: int,
    *,
    num_experts: Optional[int] = None,
    layout: Optional[EngineLayout] = None,
    expert_map: Any = None,
    pad_value: Optional[int] = None,
    cu_seqlens: Offsets = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """Validate decoded engine sequences and place them into one canonical RouteBatch.

    With `layout`, arrays hold every engine layer: their layer count and k are checked, dense
    columns must hold layout.fill_value and are dropped. `expert_map` ([P] or [layers, P])
    maps physical expert ids to logical ones. `pad_value` marks unrouted slots inside arrays
    (all k slots of a (token, layer) or none; -1 reads as the all-ones value of unsigned
    dtypes when that is not a valid id).
    """
    if layout is not None:
        if num_experts is not None and num_experts != layout.num_experts:
            raise ValueError(
                f"{caller}: num_experts expected layout.num_experts={layout.num_experts}, given "
                f"{num_experts}"
            )
        num_experts = layout.num_experts
    if num_experts is None or num_experts < 1:
        raise ValueError(f"{caller}: num_experts={num_experts} must be >= 1")
    if not sequences:
        raise ValueError(f"{caller}: the response holds no sequence")
    offsets, capacity, total = _row_offsets(
        caller, len(sequences), seq_length, cu_seqlens, packed_rows
    )
    placed: List[Tuple[int, np.ndarray]] = []
    shape_lk: Optional[Tuple[int, int]] = None
    maps = None
    for b, seq in enumerate(sequences):
        where, array, start = f"{caller}: {seq.label}", seq.routes, seq.start
        if array.ndim != 3:
            raise ValueError(
                f"{where}: shape expected [tokens, layers, k], given {tuple(array.shape)}"
            )
        if layout is not None:
            if array.shape[1] != layout.num_layers:
                raise ValueError(
                    f"{where}: layer count expected {layout.num_layers} (every transformer layer, "
                    f"EngineLayout.num_layers), given {array.shape[1]}"
                )
            if array.shape[2] != layout.topk:
                raise ValueError(f"{where}: k expected {layout.topk}, given {array.shape[2]}")
            dense = list(layout.dense_layers)
            bad = array[:, dense] != layout.fill_value
            if bad.any():
                t, column, _ = np.argwhere(bad)[0]
                raise ValueError(
                    f"{where}, position {start + t}: dense layer {dense[column]} expected the "
                    f"engine fill {layout.fill_value}, given {array[t, dense[column]].tolist()} "
                    f"(the config's MoE layers {layout.moe_layers} do not match the engine's)"
                )
            array = array[:, list(layout.moe_layers)]
        if shape_lk is None:
            shape_lk = (array.shape[1], array.shape[2])
            maps = _expert_maps(caller, expert_map, layout, shape_lk[0])
        elif array.shape[2] != shape_lk[1]:
            raise ValueError(f"{where}: k expected {shape_lk[1]}, given {array.shape[2]}")
        elif array.shape[1] != shape_lk[0]:
            raise ValueError(
                f"{where}: MoE layer count expected {shape_lk[0]}, given {array.shape[1]}"
            )
        valid = np.ones(array.shape, dtype=bool)
        if pad_value is not None:
            sentinel = int(pad_value)
            if seq.wire.kind == "u" and sentinel < 0:
                sentinel %= 1 << (8 * seq.wire.itemsize)  # -1 written into an unsigned buffer
            valid = array != sentinel
            partial = valid.any(axis=-1) & ~valid.all(axis=-1)
            if partial.any():
                t, layer = np.argwhere(partial)[0]
                raise ValueError(
                    f"{where}, position {start + t}, MoE layer {layer}: pad_value={pad_value} "
                    f"expected in all {array.shape[2]} slots or none, given "
                    f"{array[t, layer].tolist()}"
                )
        array = _check_routes(where, array, valid, num_experts, start, maps)
        if start < 0 or start + array.shape[0] > capacity[b]:
            raise ValueError(
                f"{where}: offsets: rows cover positions [{start}, {start + array.shape[0]}), "
                f"expected within the sequence's {capacity[b]} rows (seq_length / cu_seqlens)"
            )
        placed.append((offsets[b] + start, np.where(valid, array, -1)))
    indices = torch.full((total,) + shape_lk, -1, dtype=torch.int64)
    for first, array in placed:
        indices[first : first + array.shape[0]] = torch.from_numpy(array)
    return RouteBatch(indices, num_experts, num_tokens=total, seq_length=seq_length)


def extract(
    caller: str,
    routes: RouteBatch,
    rows: Sequence[int],
    starts: Sequence[int],
    *,
    layout: Optional[EngineLayout] = None,
    pad_value: Optional[int] = None,
    cu_seqlens: Offsets = None,
) -> List[np.ndarray]:
    """Inverse of place: per sequence b, positions [starts[b], starts[b] + rows[b]) as int64
    [rows_b, C, k] (C = layout.num_layers with dense columns = fill, else MoE layers). Missing
    tokens are written as pad_value, or raise when it is None (engine formats have no pad)."""
    if routes.token_index is not None or routes.layer_index is not None:
        raise ValueError(f"{caller}: needs a canonical RouteBatch (not a per-rank shard)")
    if layout is not None and (routes.num_layers, routes.topk, routes.num_experts) != (
        len(layout.moe_layers),
        layout.topk,
        layout.num_experts,
    ):
        raise ValueError(
            f"{caller}: (MoE layers, k, num_experts) expected {len(layout.moe_layers)}, "
            f"{layout.topk}, {layout.num_experts} (layout), given {routes.num_layers}, "
            f"{routes.topk}, {routes.num_experts}"
        )
    stride = routes.seq_length or routes.shape[0] // max(len(rows), 1)
    offsets, capacity, _ = _row_offsets(
        caller, len(rows), stride, cu_seqlens, max(1, -(-routes.shape[0] // stride))
    )
    indices = routes.indices
    out = []
    for b, (count, start) in enumerate(zip(rows, starts)):
        if (
            count < 0
            or start < 0
            or start + count > capacity[b]
            or offsets[b] + start + count > routes.shape[0]
        ):
            raise ValueError(
                f"{caller}: sequence {b}: offsets: positions [{start}, {start + count}) expected "
                f"within its {capacity[b]} rows"
            )
        part = indices[offsets[b] + start : offsets[b] + start + count].numpy()
        if (part < 0).any():
            if pad_value is None:
                t = int(np.argwhere((part < 0).any(axis=(1, 2)))[0][0])
                raise ValueError(
                    f"{caller}: sequence {b}, position {start + t}: has no route (missing), and "
                    "this engine format cannot mark a missing token"
                )
            part = np.where(part < 0, pad_value, part)
        if layout is not None:
            full = np.full((count, layout.num_layers, layout.topk), layout.fill_value, np.int64)
            full[:, list(layout.moe_layers)] = part
            part = full
        out.append(part)
    return out


def routes_from_engine(
    per_sequence: Sequence[Any],
    num_experts: Optional[int],
    seq_length: int,
    *,
    layout: Optional[EngineLayout] = None,
    starts: Optional[Sequence[int]] = None,
    dtype: Any = None,
    base64_shape: Optional[Sequence[Any]] = None,
    pad_value: Optional[int] = None,
    expert_map: Any = None,
    cu_seqlens: Offsets = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """Assemble a canonical RouteBatch from per-sequence route arrays (generic form).

    per_sequence: one [n_b, C, k] array per sequence (numpy, torch, nested list) or base64 of
    its flat little-endian buffer (`dtype`, default int32, and `base64_shape`: the declared
    (n, C, k) of every sequence, or one such shape per sequence; the row count n is required,
    so a payload written with another dtype cannot fit it). C is every engine layer when
    `layout` is given (dense columns are checked against its fill and dropped), else the MoE
    layers. starts[b]: position of row 0 of sequence b (default 0). See `place` for pad_value,
    expert_map, cu_seqlens and packed_rows. Engine responses: adapters.routes_from_vllm /
    routes_from_sglang / routes_from_verl.
    """
    caller = "routes_from_engine"
    per_sequence = list(per_sequence)
    starts = [0] * len(per_sequence) if starts is None else list(starts)
    if len(starts) != len(per_sequence):
        raise ValueError(
            f"{caller}: starts entries expected {len(per_sequence)}, given {len(starts)}"
        )
    sequences = []
    for b, item in enumerate(per_sequence):
        where = f"{caller}: sequence {b}"
        if isinstance(item, (bytes, bytearray, str)):
            if base64_shape is None:
                raise ValueError(f"{where}: base64 data needs base64_shape (n, C, k)")
            shape = base64_shape
            if len(shape) and not isinstance(shape[0], (int, np.integer)):
                shape = shape[b]  # one shape per sequence
            shape = tuple(int(x) for x in shape)
            if len(shape) != 3 or min(shape) < 0:
                raise ValueError(
                    f"{where}: base64_shape expected (n, C, k) with every size given (a row "
                    f"count left open would let a payload of another dtype fit), given {shape}"
                )
            flat, wire = decode_flat_base64(item, np.int32 if dtype is None else dtype, where)
            if flat.size != int(np.prod(shape)):
                raise ValueError(
                    f"{where}: value count expected {int(np.prod(shape))} for base64_shape="
                    f"{shape} of {np.dtype(wire).name}, given {flat.size} (another dtype?)"
                )
            array = flat.reshape(shape)
        else:
            array, wire = decode_array(item, where)
            wire = wire if dtype is None else wire_dtype(dtype, where)
        sequences.append(EngineSequence(array, wire, int(starts[b]), f"sequence {b}"))
    return place(
        caller,
        sequences,
        seq_length,
        num_experts=num_experts,
        layout=layout,
        expert_map=expert_map,
        pad_value=pad_value,
        cu_seqlens=cu_seqlens,
        packed_rows=packed_rows,
    )


def routes_to_engine(
    routes: RouteBatch,
    seq_lengths: Sequence[int],
    dtype: Any = torch.int32,
    base64: bool = False,
    *,
    layout: Optional[EngineLayout] = None,
    starts: Optional[Sequence[int]] = None,
    pad_value: int = -1,
    cu_seqlens: Offsets = None,
) -> List[Union[torch.Tensor, str]]:
    """Export a canonical RouteBatch as per-sequence arrays (inverse of routes_from_engine).

    seq_lengths[b]: rows to export for sequence b, from position starts[b] (default 0). dtype:
    integer dtype of the arrays; base64: flat little-endian base64 strings instead of tensors.
    layout: write every engine layer (dense columns = its fill). Missing tokens are written as
    pad_value (wrapped for unsigned dtypes; an error if that is a valid expert id).
    """
    caller = "routes_to_engine"
    wire = wire_dtype(dtype, caller)
    if routes.num_experts - 1 > np.iinfo(wire).max:
        raise ValueError(
            f"{caller}: dtype {wire.name} holds ids up to {np.iinfo(wire).max}, num_experts is "
            f"{routes.num_experts}"
        )
    sentinel = int(pad_value) % (1 << (8 * wire.itemsize)) if wire.kind == "u" else int(pad_value)
    pad_ok = (sentinel >= routes.num_experts or sentinel < 0) and (
        np.iinfo(wire).min <= sentinel <= np.iinfo(wire).max
    )
    starts = [0] * len(seq_lengths) if starts is None else list(starts)
    arrays = extract(
        caller,
        routes,
        list(seq_lengths),
        starts,
        layout=layout,
        pad_value=sentinel if pad_ok else None,
        cu_seqlens=cu_seqlens,
    )
    out: List[Union[torch.Tensor, str]] = []
    for array in arrays:
        array = array.astype(wire)
        out.append(encode_flat_base64(array, wire) if base64 else torch.from_numpy(array))
    return out
