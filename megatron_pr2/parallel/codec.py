# Binary message format of route shards for point-to-point transfers: one uint8 tensor per
# message (header, bit-packed indices, optional missing / drop masks, optional predictor cache,
# optional run-length token index and layer ids). Used by parallel/exchange.py only; the
# inference-engine formats are in engines.py.

from typing import List, Optional

import torch

from megatron_pr2.routes import PredictorCache, bits_for, pack_bits, unpack_bits

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


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def encode_shard(
    indices: torch.Tensor,
    num_experts: int,
    dropped: Optional[torch.Tensor],
    cache: Optional[PredictorCache],
    num_tokens: int,
    seq_length: Optional[int],
    token_index: Optional[torch.Tensor] = None,
    layer_index: Optional[torch.Tensor] = None,
    cached_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Serialize a route shard: header, [token code, layer ids], packed ids, masks, cache;
    cached_tokens: the whole microbatch's predictor-cache tokens (shard identity)."""
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
            as_bytes(cache.token_index.to(torch.int64)),
            as_bytes(cache.hidden),
            as_bytes(cache.logits),
        ]
    header = torch.tensor(
        [_MAGIC, T, L, k, num_experts, num_tokens, -1 if seq_length is None else seq_length, flags]
        + [extra[0].numel() if extra else 0]
        + cache_meta
        + [-1 if cached_tokens is None else cached_tokens, 0],
        dtype=torch.int64,
    )
    assert header.numel() == _HEADER
    return torch.cat(
        [as_bytes(header)] + [as_bytes(x) for x in extra] + [as_bytes(p) for p in parts]
    )


def decode_shard(payload: torch.Tensor) -> dict:
    """Inverse of encode_shard: dict with indices [T, L, k] int64 (-1 missing), dropped, cache, ..."""
    payload = payload.to("cpu")
    if payload.numel() < 8 * _HEADER:
        raise ValueError("route transfer: truncated message")
    header = payload[: 8 * _HEADER].clone().view(torch.int64)
    if int(header[0]) != _MAGIC:
        raise ValueError("route transfer: corrupt message (bad magic)")
    T, L, k, E, num_tokens, seq_length, flags, code_len = (int(x) for x in header[1:9])
    C, H, EL, hd, ld, cached_tokens = (int(x) for x in header[9:15])
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
        "cached_tokens": None if cached_tokens < 0 else cached_tokens,
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
