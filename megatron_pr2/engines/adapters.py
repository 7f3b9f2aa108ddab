# One call per inference-engine response -> canonical RouteBatch, and the inverse exports.
#
# What each engine sends, per sequence (n = tokens of the sequence, prompt plus generated; the
# last generated token is never fed back, so it has no route; C = num_hidden_layers, every
# transformer layer, dense layers filled with 0; k = num_experts_per_tok):
#   vLLM, in process: CompletionOutput.routed_experts, ndarray [n - 1 - start, C, k], uint8
#     when num_experts <= 256 else uint16 (int32 in older releases); start =
#     SamplingParams.routed_experts_prompt_start (default 0), not echoed in the output.
#   vLLM, OpenAI-compatible server: choices[i].routed_experts, base64 of the `.npy` file of that
#     array; choices[i].prompt_token_ids / token_ids when the request set return_token_ids.
#   SGLang: meta_info["routed_experts"], base64 of the flat int32 little-endian buffer of
#     [n - 1 - start, C, k] (no shape; meta_info["routed_experts_dtype"] when a release narrows
#     it); start = request field routed_experts_start_len; meta_info prompt_tokens /
#     completion_tokens give n. Multi-turn sessions return one chunk per turn.
#   verl: [B, T, C, k] zeros with each sequence's rows at its attention_mask span (left-padded
#     prompt, right-padded response), the last token's row left 0.
# Canonical layout and checks: engines/assemble.py.

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_pr2.engines.assemble import EngineSequence, Offsets, extract, place
from megatron_pr2.engines.layout import EngineLayout
from megatron_pr2.engines.wire import (
    decode_array,
    decode_flat_base64,
    decode_npy_base64,
    encode_flat_base64,
    encode_npy_base64,
)
from megatron_pr2.routes import RouteBatch

__all__ = [
    "routes_from_vllm",
    "routes_to_vllm",
    "routes_from_sglang",
    "routes_to_sglang",
    "routes_from_verl",
    "routes_to_verl",
]

PerSequence = Optional[Union[int, Sequence[int]]]


def _per_sequence(caller: str, name: str, value: PerSequence, count: int, default: Any) -> list:
    if value is None or isinstance(value, (int, np.integer)):
        return [default if value is None else int(value)] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(
            f"{caller}: {name} entries expected {count} (sequences), given {len(value)}"
        )
    return value


def _check_rows(where: str, rows: int, num_tokens: Optional[int], start: int, field: str) -> None:
    """The engine returns positions [start, num_tokens - 1): the last token is never fed."""
    if num_tokens is not None and rows != num_tokens - 1 - start:
        raise ValueError(
            f"{where}: token count expected {num_tokens - 1 - start} route rows (num_tokens "
            f"{num_tokens} - 1 - {field} {start}), given {rows}"
        )


def _check_dtype(where: str, wire: np.dtype, layout: EngineLayout) -> None:
    if wire.kind == "u" and np.iinfo(wire).max < layout.num_experts - 1:
        raise ValueError(
            f"{where}: dtype {wire.name} holds ids up to {np.iinfo(wire).max}, expected one that "
            f"holds num_experts={layout.num_experts}"
        )


def _vllm_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8 if num_experts <= 256 else np.uint16)


def _vllm_items(response: Any) -> List[Tuple[Any, Optional[int], str]]:
    """(routed_experts payload, num_tokens or None, label) per sequence of a vLLM response."""
    items: List[Tuple[Any, Optional[int], str]] = []

    def add(item: Any, index: int) -> None:
        if hasattr(item, "outputs") and hasattr(item, "prompt_token_ids"):  # RequestOutput
            prompt = len(item.prompt_token_ids or ())
            for out in item.outputs:
                label = f"request {index} output {out.index}"
                items.append((out.routed_experts, prompt + len(out.token_ids), label))
        elif isinstance(item, Mapping) and "choices" in item:  # OpenAI-compatible JSON
            top_prompt = item.get("prompt_token_ids")
            for choice in item["choices"]:
                prompt = choice.get("prompt_token_ids", top_prompt)
                tokens = choice.get("token_ids")
                count = None if prompt is None or tokens is None else len(prompt) + len(tokens)
                label = f"response {index} choice {choice.get('index', len(items))}"
                items.append((choice.get("routed_experts"), count, label))
        elif isinstance(item, Mapping):  # one choice
            items.append((item.get("routed_experts"), None, f"choice {index}"))
        elif hasattr(item, "routed_experts"):  # CompletionOutput
            items.append((item.routed_experts, None, f"output {index}"))
        else:  # ndarray / tensor / base64 .npy string
            items.append((item, None, f"sequence {index}"))

    single = isinstance(response, (Mapping, np.ndarray, torch.Tensor, str, bytes)) or hasattr(
        response, "outputs"
    )
    for index, item in enumerate([response] if single else list(response)):
        add(item, index)
    return items


def routes_from_vllm(
    response: Any,
    layout: EngineLayout,
    seq_length: int,
    *,
    num_tokens: PerSequence = None,
    prompt_start: PerSequence = None,
    expert_map: Any = None,
    cu_seqlens: Offsets = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """A RouteBatch from one vLLM response: a RequestOutput or a list of them (in process,
    `LLM(..., enable_return_routed_experts=True)`), the JSON dict of the OpenAI-compatible
    server (`--enable-return-routed-experts`), or a list of per-sequence routed_experts
    (ndarray / tensor / base64 .npy string / CompletionOutput / choice dict).

    Sequence b (request-major, then output index) is placed at positions
    prompt_start[b] + i of canonical rows b * seq_length (or cu_seqlens[b]). num_tokens[b]
    (prompt + generated tokens) is taken from the response where it says (RequestOutput, or
    choices with prompt_token_ids and token_ids) and checked against the row count; give it
    for bare arrays to have it checked too. prompt_start: the request's
    routed_experts_prompt_start (vLLM does not echo it). expert_map: physical -> logical ids.
    """
    caller = "routes_from_vllm"
    items = _vllm_items(response)
    counts = _per_sequence(caller, "num_tokens", num_tokens, len(items), None)
    starts = _per_sequence(caller, "prompt_start", prompt_start, len(items), 0)
    sequences = []
    for (payload, found, label), count, start in zip(items, counts, starts):
        where = f"{caller}: {label}"
        if payload is None:
            raise ValueError(
                f"{where}: routed_experts is None (engine started without "
                "--enable-return-routed-experts / enable_return_routed_experts=True, or the "
                "request was aborted before a forward pass)"
            )
        if found is not None and count is not None and found != count:
            raise ValueError(
                f"{where}: num_tokens expected {found} (prompt + generated tokens in the "
                f"response), given {count}"
            )
        if isinstance(payload, (str, bytes, bytearray)):
            array, wire = decode_npy_base64(payload, where)
        else:
            array, wire = decode_array(payload, where)
        _check_dtype(where, wire, layout)
        if array.ndim != 3:
            raise ValueError(f"{where}: shape expected [tokens, layers, k], given {array.shape}")
        _check_rows(where, array.shape[0], found if count is None else count, start, "prompt_start")
        sequences.append(EngineSequence(array, wire, start, label))
    return place(
        caller,
        sequences,
        seq_length,
        layout=layout,
        expert_map=expert_map,
        cu_seqlens=cu_seqlens,
        packed_rows=packed_rows,
    )


def routes_to_vllm(
    routes: RouteBatch,
    layout: EngineLayout,
    num_tokens: Sequence[int],
    *,
    prompt_start: PerSequence = None,
    http: bool = False,
    dtype: Any = None,
    cu_seqlens: Offsets = None,
) -> List[Union[np.ndarray, str]]:
    """Per sequence, what vLLM returns as routed_experts: [n - 1 - start, C, k] arrays (uint8 if
    num_experts <= 256 else uint16, or `dtype`), or with http=True base64 `.npy` strings."""
    caller = "routes_to_vllm"
    starts = _per_sequence(caller, "prompt_start", prompt_start, len(num_tokens), 0)
    rows = [n - 1 - s for n, s in zip(num_tokens, starts)]
    wire = _vllm_dtype(layout.num_experts) if dtype is None else np.dtype(dtype)
    _check_dtype(caller, wire, layout)
    arrays = extract(caller, routes, rows, starts, layout=layout, cu_seqlens=cu_seqlens)
    arrays = [a.astype(wire) for a in arrays]
    return [encode_npy_base64(a) for a in arrays] if http else arrays


def _sglang_meta(item: Any) -> List[Mapping]:
    """The meta_info dicts of one /generate (or chat) response: one per sequence."""
    if isinstance(item, Mapping) and "meta_info" in item:
        return [item["meta_info"]]
    if isinstance(item, Mapping) and "choices" in item:
        return [choice["meta_info"] for choice in item["choices"]]
    if isinstance(item, Mapping):
        return [item]
    raise ValueError(
        f"routes_from_sglang: expected a response dict (with meta_info) or a meta_info dict, "
        f"given {type(item).__name__}"
    )


def routes_from_sglang(
    response: Any,
    layout: EngineLayout,
    seq_length: int,
    *,
    start_len: PerSequence = None,
    expert_map: Any = None,
    cu_seqlens: Offsets = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """A RouteBatch from one SGLang response (`--enable-return-routed-experts`, request field
    "return_routed_experts": true): a /generate response dict, a list of them (batch request),
    a meta_info dict, or an OpenAI-compatible response whose choices carry meta_info. A list
    item that is itself a list is one multi-turn sequence in chunks (one response per turn):
    each chunk covers [routed_experts_start_len, n - 1) of the growing sequence; chunks must
    leave no gap, and a later chunk replaces the rows it overlaps.

    Row counts are checked against meta_info prompt_tokens + completion_tokens. start_len:
    the routed_experts_start_len each request sent (default 0; SGLang does not echo it, a
    meta_info that does must agree), per sequence, and for a chunked sequence a list with
    one entry per chunk. expert_map: physical -> logical ids (EPLB deployments that return
    physical ids).
    """
    caller = "routes_from_sglang"
    items = response if isinstance(response, list) else [response]
    chunked = [
        (
            [m for part in item for m in _sglang_meta(part)]
            if isinstance(item, list)
            else _sglang_meta(item)
        )
        for item in items
    ]
    # A plain list item is one response that may hold several sequences (choices).
    sequences_meta: List[List[Mapping]] = []
    for item, metas in zip(items, chunked):
        sequences_meta.extend([metas] if isinstance(item, list) else [[m] for m in metas])
    starts = _per_sequence(caller, "start_len", start_len, len(sequences_meta), None)
    per_token = layout.num_layers * layout.topk
    sequences = []
    for b, (metas, given) in enumerate(zip(sequences_meta, starts)):
        rows: List[np.ndarray] = []
        first = covered = None
        wire = np.dtype(np.int32)
        if given is not None and not isinstance(given, (list, tuple)) and len(metas) > 1:
            raise ValueError(
                f"{caller}: sequence {b}: start_len expected a list with one entry per chunk "
                f"({len(metas)} chunks), given {given}"
            )
        given = list(given) if isinstance(given, (list, tuple)) else [given] * len(metas)
        if len(given) != len(metas):
            raise ValueError(
                f"{caller}: sequence {b}: start_len entries expected {len(metas)} (one per "
                f"chunk), given {len(given)}"
            )
        for c, (meta, given_start) in enumerate(zip(metas, given)):
            where = f"{caller}: sequence {b}" + (f" chunk {c}" if len(metas) > 1 else "")
            payload = meta.get("routed_experts")
            if payload is None:
                raise ValueError(
                    f"{where}: meta_info has no routed_experts (server started without "
                    '--enable-return-routed-experts, or the request lacks "return_routed_experts"'
                    ": true)"
                )
            echoed = meta.get("routed_experts_start_len")
            if given_start is not None and echoed is not None and int(echoed) != given_start:
                raise ValueError(
                    f"{where}: start_len expected {int(echoed)} (meta_info "
                    f"routed_experts_start_len), given {given_start}"
                )
            start = int(given_start if given_start is not None else (echoed or 0))
            flat, wire = decode_flat_base64(
                payload, meta.get("routed_experts_dtype", "int32"), f"{where}: routed_experts"
            )
            _check_dtype(where, wire, layout)
            prompt, completion = meta.get("prompt_tokens"), meta.get("completion_tokens")
            count = None if prompt is None or completion is None else int(prompt + completion)
            if flat.size % per_token:
                raise ValueError(
                    f"{where}: value count expected a multiple of num_layers * k = "
                    f"{layout.num_layers} * {layout.topk}, given {flat.size}"
                )
            array = flat.reshape(-1, layout.num_layers, layout.topk)
            _check_rows(where, array.shape[0], count, start, "routed_experts_start_len")
            if first is None:
                first, covered = start, start
            if not first <= start <= covered:
                raise ValueError(
                    f"{where}: offsets: routed_experts_start_len expected in [{first}, {covered}]"
                    f" (positions the earlier chunks cover), given {start}"
                )
            keep = start - first
            rows = [np.concatenate(rows)[:keep]] if rows else []
            rows.append(array)
            covered = start + array.shape[0]
        sequences.append(EngineSequence(np.concatenate(rows), wire, first, f"sequence {b}"))
    return place(
        caller,
        sequences,
        seq_length,
        layout=layout,
        expert_map=expert_map,
        cu_seqlens=cu_seqlens,
        packed_rows=packed_rows,
    )


def routes_to_sglang(
    routes: RouteBatch,
    layout: EngineLayout,
    prompt_tokens: Sequence[int],
    completion_tokens: Sequence[int],
    *,
    start_len: PerSequence = None,
    cu_seqlens: Offsets = None,
) -> List[dict]:
    """Per sequence, the meta_info fields SGLang returns: routed_experts (base64 int32 LE of
    [n - 1 - start, C, k]), routed_experts_start_len, prompt_tokens, completion_tokens."""
    caller = "routes_to_sglang"
    if len(prompt_tokens) != len(completion_tokens):
        raise ValueError(
            f"{caller}: completion_tokens entries expected {len(prompt_tokens)} (one per "
            f"prompt_tokens), given {len(completion_tokens)}"
        )
    starts = _per_sequence(caller, "start_len", start_len, len(prompt_tokens), 0)
    counts = [int(p) + int(c) for p, c in zip(prompt_tokens, completion_tokens)]
    rows = [n - 1 - s for n, s in zip(counts, starts)]
    arrays = extract(caller, routes, rows, starts, layout=layout, cu_seqlens=cu_seqlens)
    return [
        {
            "prompt_tokens": int(p),
            "completion_tokens": int(c),
            "routed_experts": encode_flat_base64(a, "<i4"),
            "routed_experts_start_len": s,
        }
        for a, p, c, s in zip(arrays, prompt_tokens, completion_tokens, starts)
    ]


def _mask_spans(caller: str, mask: np.ndarray) -> List[Tuple[int, int]]:
    """[first, end) of each row's single run of ones."""
    spans = []
    for b, row in enumerate(mask):
        ones = np.flatnonzero(row)
        if ones.size and ones[-1] - ones[0] + 1 != ones.size:
            raise ValueError(
                f"{caller}: attention_mask row {b} expected one contiguous run of ones (left-"
                f"padded prompt + response), given ones at {ones.tolist()}"
            )
        spans.append((int(ones[0]), int(ones[-1]) + 1) if ones.size else (0, 0))
    return spans


def routes_from_verl(
    routed_experts: Any,
    attention_mask: Any,
    layout: EngineLayout,
    *,
    remove_padding: bool = False,
    seq_length: Optional[int] = None,
    expert_map: Any = None,
    cu_seqlens: Offsets = None,
    packed_rows: int = 1,
) -> RouteBatch:
    """A RouteBatch from a verl-style batch: routed_experts [B, T, C, k] and attention_mask
    [B, T]. Sequence b's routes are rows [first, end - 1) of its mask span [first, end); every
    other row must hold layout.fill_value (an error names the first that does not).

    Placement: the padded layout (row b * T + t; seq_length defaults to T), or with
    remove_padding=True each sequence from position 0 (row b * seq_length), or packed at
    cu_seqlens[b] (implies remove_padding)."""
    caller = "routes_from_verl"
    array, wire = decode_array(routed_experts, f"{caller}: routed_experts")
    mask = np.asarray(
        attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask
    )
    if array.ndim != 4 or mask.shape != array.shape[:2]:
        raise ValueError(
            f"{caller}: shapes expected routed_experts [B, T, layers, k] and attention_mask "
            f"[B, T], given {tuple(array.shape)} and {tuple(mask.shape)}"
        )
    _check_dtype(caller, wire, layout)
    unpadded = remove_padding or cu_seqlens is not None
    sequences = []
    for b, (first, end) in enumerate(_mask_spans(caller, mask)):
        last = max(first, end - 1)  # the last token is never fed back: no route
        outside = np.ones(array.shape[1], dtype=bool)
        outside[first:last] = False
        bad = outside[:, None, None] & (array[b] != layout.fill_value)
        if bad.any():
            t = int(np.argwhere(bad)[0][0])
            raise ValueError(
                f"{caller}: sequence {b}, row {t}: expected the fill {layout.fill_value} outside "
                f"the routed rows [{first}, {last}) of its attention_mask, given "
                f"{array[b, t].tolist()}"
            )
        start = 0 if unpadded else first
        sequences.append(EngineSequence(array[b, first:last], wire, start, f"sequence {b}"))
    return place(
        caller,
        sequences,
        array.shape[1] if seq_length is None else seq_length,
        layout=layout,
        expert_map=expert_map,
        cu_seqlens=cu_seqlens,
        packed_rows=packed_rows,
    )


def routes_to_verl(
    routes: RouteBatch, layout: EngineLayout, attention_mask: Any, *, dtype: Any = None
) -> np.ndarray:
    """The verl-style [B, T, C, k] batch of padded-layout routes (inverse of routes_from_verl
    with remove_padding=False): fill outside each mask span and at its last token."""
    caller = "routes_to_verl"
    mask = np.asarray(
        attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask
    )
    spans = _mask_spans(caller, mask)
    rows = [max(0, end - 1 - first) for first, end in spans]
    arrays = extract(caller, routes, rows, [first for first, _ in spans], layout=layout)
    wire = _vllm_dtype(layout.num_experts) if dtype is None else np.dtype(dtype)
    out = np.full(mask.shape + (layout.num_layers, layout.topk), layout.fill_value, dtype=wire)
    for b, ((first, _), array) in enumerate(zip(spans, arrays)):
        out[b, first : first + array.shape[0]] = array
    return out
