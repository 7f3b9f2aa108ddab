# Import and export of inference-engine route layouts (R3: replay the rollout engine's routes).
#
# Engine layout, per sequence b (n_b = routed tokens of b, L = MoE layers, k = router top-k):
#   [n_b, L, k] expert ids, int32 / uint16 / uint8, as a numpy array, a torch tensor, a nested
#   list, or base64-encoded bytes of the flat C-order array (shape metadata passed separately).
# Engines route every token they *feed*: prompt and generated tokens except the last generated
# one, so n_b is usually tokens_b - 1 (some engines return tokens_b rows). Row i is the route of
# position i of the sequence.
#
# Canonical layout (routes.RouteBatch): batch-major, sequence b occupies rows b*S .. b*S+S-1
# (S = seq_length); for packed THD input (`cu_seqlens`) sequence b starts at row cu_seqlens[b] of
# one packed row. Rows an engine did not route (the last token, right padding, THD padding) are
# *missing* (-1 in every slot): replay fails loudly if a router is asked for one of them, unless
# the replay policy fills them (see the router).
#
# Slot entries equal to `pad_value` mark an unrouted (token, layer): the engine convention is
# -1; for an unsigned dtype, -1 means the dtype's all-ones value (e.g. 255 for uint8), which is
# only unambiguous when that value is not a valid expert id (num_experts <= 255 for uint8).

import base64 as b64
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_pr2.routes import RouteBatch

__all__ = ["routes_from_engine", "routes_to_engine"]

EngineArray = Union[np.ndarray, torch.Tensor, bytes, str, list]

_NP_DTYPES = {
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.int16: np.int16,
    torch.uint16: np.uint16,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
}
_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)


def _np_dtype(dtype: Any) -> np.dtype:
    """numpy dtype from a torch dtype, numpy dtype or its name ('int32', 'uint8', ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _NP_DTYPES:
            raise ValueError(f"dtype={dtype} is not an integer dtype engines use for routes")
        return np.dtype(_NP_DTYPES[dtype])
    try:
        out = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype={dtype!r} is not a numpy/torch integer dtype") from exc
    if out.kind not in "iu":
        raise ValueError(f"dtype={dtype!r} is not an integer dtype")
    return out


def _pad_sentinel(pad_value: Optional[int], np_dtype: np.dtype, num_experts: int) -> Optional[int]:
    """The integer value (as read into int64) that marks an unrouted slot, or None."""
    if pad_value is None:
        return None
    if np_dtype.kind == "u" and pad_value < 0:
        # -1 written into an unsigned buffer reads back as the all-ones value.
        wrapped = int(pad_value) % (1 << (8 * np_dtype.itemsize))
        return wrapped if wrapped >= num_experts else None
    return int(pad_value)


def _decode_one(
    item: EngineArray,
    b: int,
    dtype: Optional[Any],
    base64_shape: Optional[Union[Sequence[int], Sequence[Sequence[int]]]],
) -> Tuple[np.ndarray, np.dtype]:
    """One engine array as (int64 numpy array, its wire dtype)."""
    if isinstance(item, (bytes, bytearray, str)):
        wire = _np_dtype(dtype if dtype is not None else np.int32)
        if base64_shape is None:
            raise ValueError(
                f"routes_from_engine: sequence {b} is base64 data but base64_shape is not given "
                f"(pass (layers, k), (tokens, layers, k) or one shape per sequence)"
            )
        shape = base64_shape
        if len(shape) and not isinstance(shape[0], (int, np.integer)):
            shape = shape[b]  # one shape per sequence
        try:
            raw = b64.b64decode(item, validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"routes_from_engine: sequence {b} is not valid base64: {exc}"
            ) from exc
        if len(raw) % wire.itemsize:
            raise ValueError(
                f"routes_from_engine: sequence {b} has {len(raw)} bytes, not a multiple of "
                f"{wire.itemsize} ({wire.name})"
            )
        flat = np.frombuffer(raw, dtype=wire)
        shape = tuple(int(x) for x in shape)
        if len(shape) == 2:
            shape = (-1,) + shape
        per_token = int(np.prod([x for x in shape if x != -1])) if shape else 1
        if len(shape) != 3 or per_token == 0 or flat.size % per_token:
            raise ValueError(
                f"routes_from_engine: sequence {b}: {flat.size} {wire.name} values do not fit "
                f"base64_shape={tuple(shape)}"
            )
        try:
            array = flat.reshape(shape)
        except ValueError as exc:
            raise ValueError(
                f"routes_from_engine: sequence {b}: {flat.size} values do not fit base64_shape="
                f"{tuple(shape)}"
            ) from exc
        return array.astype(np.int64), wire
    if isinstance(item, torch.Tensor):
        if item.dtype.is_floating_point or item.dtype == torch.bool or item.is_complex():
            raise ValueError(
                f"routes_from_engine: sequence {b} has dtype {item.dtype}, not integer"
            )
        wire = _np_dtype(item.dtype)
        return item.detach().to("cpu", torch.int64).numpy(), wire
    array = np.asarray(item)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)  # an empty nested list
    if array.dtype.kind not in "iu":
        raise ValueError(f"routes_from_engine: sequence {b} has dtype {array.dtype}, not integer")
    wire = array.dtype if dtype is None else _np_dtype(dtype)
    return array.astype(np.int64), wire


def routes_from_engine(
    per_sequence: Sequence[EngineArray],
    num_experts: int,
    seq_length: int,
    *,
    dtype: Optional[Any] = None,
    base64_shape: Optional[Union[Sequence[int], Sequence[Sequence[int]]]] = None,
    pad_value: Optional[int] = -1,
    layer_columns: Optional[Sequence[int]] = None,
    cu_seqlens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """Assemble a canonical RouteBatch from per-sequence inference-engine routes.

    Args:
        per_sequence: one array [n_b, L, k] per sequence (numpy, torch, nested list, or base64
            bytes/str of the flat array); n_b <= seq_length (usually tokens_b - 1).
        num_experts: E; every id must be in [0, E).
        seq_length: S, the canonical row stride of one sequence (the trainer's padded length).
            With `cu_seqlens` it is the length of one row of the packed input.
        dtype: wire dtype of base64 data (default int32); for arrays, overrides the dtype used
            to interpret `pad_value` (e.g. int32 data that holds uint8 semantics).
        base64_shape: shape of base64 data: (L, k) (tokens inferred), (n, L, k) (-1 allowed for
            n), or a list with one such shape per sequence.
        pad_value: slot value meaning "no route" (-1 by default; None: every slot is routed).
            A (token, layer) is missing when all k slots hold it; some but not all is an error.
        layer_columns: engine layer columns to keep, in global MoE-layer order (for engines that
            report every transformer layer and pad dense layers).
        cu_seqlens: packed THD input: sequence b starts at row cu_seqlens[b] of the packed
            stream of packed_rows * seq_length tokens (pass the padded offsets for padded THD);
            its routes must fit before cu_seqlens[b + 1]. Same convention as
            sharding.layout_for_rank(batch_size=packed_rows, seq_length, cu_seqlens=...).
        packed_rows: with cu_seqlens, how many rows of seq_length the packed stream spans
            (megatron-core 0.19 concatenates a micro-batch's rows into one); default 1.

    Returns:
        RouteBatch with indices [B * S, L, k] (THD: [packed_rows * S, L, k]), unrouted rows
        missing, seq_length=S.
    """
    if num_experts < 1:
        raise ValueError(f"routes_from_engine: num_experts={num_experts} must be >= 1")
    if seq_length < 1:
        raise ValueError(f"routes_from_engine: seq_length={seq_length} must be >= 1")
    per_sequence = list(per_sequence)
    if not per_sequence:
        raise ValueError("routes_from_engine: per_sequence is empty")
    num_seqs = len(per_sequence)
    if cu_seqlens is not None:
        starts = torch.as_tensor(cu_seqlens, dtype=torch.int64).reshape(-1)
        if starts.numel() != num_seqs + 1:
            raise ValueError(
                f"routes_from_engine: cu_seqlens has {starts.numel()} entries for {num_seqs} "
                f"sequences (need {num_seqs + 1})"
            )
        if int(starts[0]) != 0 or bool((starts[1:] < starts[:-1]).any()):
            raise ValueError(
                f"routes_from_engine: cu_seqlens={starts.tolist()} must start at 0 and not decrease"
            )
        if packed_rows < 1:
            raise ValueError(f"routes_from_engine: packed_rows={packed_rows} must be >= 1")
        total = packed_rows * seq_length
        if int(starts[-1]) > total:
            raise ValueError(
                f"routes_from_engine: cu_seqlens[-1]={int(starts[-1])} exceeds the packed stream "
                f"of packed_rows * seq_length={total} tokens"
            )
        capacity = (starts[1:] - starts[:-1]).tolist()
        offsets = starts[:-1].tolist()
    else:
        capacity = [seq_length] * num_seqs
        offsets = [b * seq_length for b in range(num_seqs)]
        total = num_seqs * seq_length

    decoded: List[np.ndarray] = []
    shape_lk: Optional[Tuple[int, int]] = None
    for b, item in enumerate(per_sequence):
        array, wire = _decode_one(item, b, dtype, base64_shape)
        if array.ndim != 3:
            raise ValueError(
                f"routes_from_engine: sequence {b} has shape {tuple(array.shape)}; expected "
                f"[tokens, layers, k]"
            )
        if layer_columns is not None:
            cols = list(layer_columns)
            if cols and (min(cols) < 0 or max(cols) >= array.shape[1]):
                raise ValueError(
                    f"routes_from_engine: layer_columns {cols} out of range for sequence {b} with "
                    f"{array.shape[1]} layers"
                )
            array = array[:, cols]
        if shape_lk is None:
            shape_lk = (array.shape[1], array.shape[2])
        elif array.shape[2] != shape_lk[1]:
            raise ValueError(
                f"routes_from_engine: k mismatch: sequence {b} has k={array.shape[2]}, sequence 0 "
                f"has k={shape_lk[1]}"
            )
        elif array.shape[1] != shape_lk[0]:
            raise ValueError(
                f"routes_from_engine: layer-count mismatch: sequence {b} has {array.shape[1]} "
                f"MoE layers, sequence 0 has {shape_lk[0]}"
            )
        if array.shape[0] > capacity[b]:
            raise ValueError(
                f"routes_from_engine: sequence {b} has {array.shape[0]} routed tokens, more than "
                f"its {capacity[b]} rows (seq_length / cu_seqlens)"
            )
        sentinel = _pad_sentinel(pad_value, wire, num_experts)
        pad = array == sentinel if sentinel is not None else np.zeros(array.shape, dtype=bool)
        partial = pad.any(axis=-1) & ~pad.all(axis=-1)
        if partial.any():
            t, layer = np.argwhere(partial)[0]
            raise ValueError(
                f"routes_from_engine: sequence {b}, token {t}, layer {layer}: some but not all "
                f"of the k slots hold pad_value={pad_value}"
            )
        valid = ~pad
        bad = valid & ((array < 0) | (array >= num_experts))
        if bad.any():
            t, layer, slot = np.argwhere(bad)[0]
            raise ValueError(
                f"routes_from_engine: sequence {b}, token {t}, layer {layer}: expert id "
                f"{int(array[t, layer, slot])} out of range for num_experts={num_experts}"
            )
        if array.shape[2] > 1 and array.size:
            ordered = np.sort(np.where(valid, array, -1), axis=-1)
            dup = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(axis=-1)
            if dup.any():
                t, layer = np.argwhere(dup)[0]
                raise ValueError(
                    f"routes_from_engine: sequence {b}, token {t}, layer {layer}: duplicate expert "
                    f"in top-k {array[t, layer].tolist()}"
                )
        decoded.append(np.where(valid, array, -1))

    num_layers, topk = shape_lk
    indices = torch.full((total, num_layers, topk), -1, dtype=torch.int64)
    for b, array in enumerate(decoded):
        rows = array.shape[0]
        indices[offsets[b] : offsets[b] + rows] = torch.from_numpy(array)
    return RouteBatch(indices, num_experts, num_tokens=total, seq_length=seq_length)


def routes_to_engine(
    routes: RouteBatch,
    seq_lengths: Sequence[int],
    dtype: Any = torch.int32,
    base64: bool = False,
    *,
    pad_value: int = -1,
    cu_seqlens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
) -> List[Union[torch.Tensor, str]]:
    """Export a canonical RouteBatch as per-sequence engine arrays (inverse of routes_from_engine).

    Args:
        routes: canonical RouteBatch (rows in canonical order: token_index None).
        seq_lengths: rows to export per sequence (n_b; pass tokens_b - 1 for the engine
            convention). Sequence b's rows start at b * routes.seq_length (or cu_seqlens[b]).
        dtype: integer dtype of the exported arrays (torch.int32 / torch.uint16 / torch.uint8).
        base64: return base64 str of the flat C-order array instead of tensors (decode with
            routes_from_engine(..., dtype=dtype, base64_shape=(L, k))).
        pad_value: written for missing (token, layer) slots (wrapped for unsigned dtypes).
        cu_seqlens: packed THD offsets used when the routes were imported with cu_seqlens.
    """
    if routes.token_index is not None or routes.layer_index is not None:
        raise ValueError("routes_to_engine needs a canonical RouteBatch (not a per-rank shard)")
    wire = _np_dtype(dtype)
    info = np.iinfo(wire)
    if routes.num_experts - 1 > info.max:
        raise ValueError(
            f"routes_to_engine: dtype={wire.name} cannot hold expert ids up to "
            f"{routes.num_experts - 1}"
        )
    num_seqs = len(seq_lengths)
    if cu_seqlens is not None:
        starts = torch.as_tensor(cu_seqlens, dtype=torch.int64).reshape(-1).tolist()
        if len(starts) != num_seqs + 1:
            raise ValueError(
                f"routes_to_engine: cu_seqlens has {len(starts)} entries for {num_seqs} sequences"
            )
        offsets, capacity = starts[:-1], [e - s for s, e in zip(starts[:-1], starts[1:])]
    else:
        stride = (
            routes.seq_length
            if routes.seq_length is not None
            else routes.shape[0] // max(1, num_seqs)
        )
        offsets, capacity = [b * stride for b in range(num_seqs)], [stride] * num_seqs
    indices = routes.indices
    sentinel = int(pad_value) % (1 << (8 * wire.itemsize)) if wire.kind == "u" else int(pad_value)
    pad_ok = (info.min <= sentinel <= info.max) and not (
        wire.kind == "u" and sentinel < routes.num_experts
    )
    out: List[Union[torch.Tensor, str]] = []
    for b, n in enumerate(seq_lengths):
        if n < 0 or n > capacity[b] or offsets[b] + n > indices.shape[0]:
            raise ValueError(
                f"routes_to_engine: sequence {b} asks for {n} rows; it has {capacity[b]} rows "
                f"starting at row {offsets[b]} of {indices.shape[0]}"
            )
        rows = indices[offsets[b] : offsets[b] + n]
        if not pad_ok and bool((rows < 0).any()):
            raise ValueError(
                f"routes_to_engine: sequence {b} has unrouted tokens but pad_value={pad_value} as "
                f"{wire.name} is {sentinel}, a valid expert id or out of range; use a wider dtype"
            )
        array = np.where(rows.numpy() < 0, sentinel, rows.numpy()).astype(wire)
        if base64:
            out.append(b64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"))
        else:
            out.append(torch.from_numpy(array))
    return out
