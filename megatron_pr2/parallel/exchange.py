# Route shards between the ranks of a process group, with collectives only: every exchange is
# two all_to_all_single calls over the group (the message sizes, then the bytes with uneven
# splits), never one point-to-point message per peer.
#
#   scatter_routes   every rank gets only its own packed slice from the canonical batch on `src`
#   gather_routes    the canonical batch rebuilt on `dst` (export, debugging: it holds every
#                    layer of the microbatch; not for the training path)
#   exchange_routes  sharded re-microbatching: each rank sends the pieces (tokens x its stage's
#                    layers) that other ranks need and receives its own; no rank ever holds more
#                    layers than its pieces carry, no rank relays another's
#
# The process group is always explicit (a torch.distributed.ProcessGroup: e.g. the data-parallel
# group for re-microbatching); ranks are ranks within it. Messages use parallel/codec.py.

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pr2.parallel.codec import (
    as_bytes,
    decode_shard,
    decode_token_index,
    encode_shard,
    encode_token_index,
)
from megatron_pr2.parallel.collectives import comm_device, raise_on_any_rank
from megatron_pr2.parallel.sharding import (
    IntSeq,
    cached_tokens,
    check_request,
    check_shard,
    layer_tensor,
    row_layers,
    row_tokens,
    shard_identity,
    slice_shard,
)
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout, narrowest_int_dtype

# An 8-byte refusal in place of a shard (shards start with a 128-byte header).
_REFUSED = torch.tensor([-1], dtype=torch.int64)


def _check_group(name: str, group: object) -> dist.ProcessGroup:
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"{name}: group={group!r} must be a torch.distributed.ProcessGroup (e.g. the "
            "data-parallel group); there is no default"
        )
    return group


def exchange_bytes(
    outgoing: Sequence[torch.Tensor], group: dist.ProcessGroup
) -> List[torch.Tensor]:
    """All-to-all of one uint8 message per rank of `group` (outgoing[r] goes to group rank r;
    empty messages allowed): the sizes, then the bytes. Returns the message from each rank.
    Collective: every rank of `group` calls it (one host read of the W sizes per call)."""
    world = group.size()
    assert len(outgoing) == world, (len(outgoing), world)
    device = comm_device(group)
    send_sizes = [int(m.numel()) for m in outgoing]
    sizes = torch.tensor(send_sizes, dtype=torch.int64, device=device)
    recv_sizes = torch.empty_like(sizes)
    dist.all_to_all_single(recv_sizes, sizes, group=group)
    recv_sizes = recv_sizes.tolist()
    send = torch.cat([m.reshape(-1).to(torch.uint8) for m in outgoing]).to(device)
    received = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=recv_sizes,
        input_split_sizes=send_sizes,
        group=group,
    )
    return list(received.cpu().split(recv_sizes))


def _encode(routes: RouteBatch, sharded: bool = True) -> torch.Tensor:
    return encode_shard(
        routes.indices,
        routes.num_experts,
        routes.dropped,
        routes.cache,
        routes.num_tokens,
        routes.seq_length,
        token_index=row_tokens(routes) if sharded else None,
        layer_index=row_layers(routes) if sharded else None,
    )


def _as_routes(parts: dict) -> RouteBatch:
    return RouteBatch(
        parts["indices"],
        parts["num_experts"],
        dropped=parts["dropped"],
        token_index=parts.get("token_index"),
        layer_index=parts.get("layer_index"),
        num_tokens=parts["num_tokens"],
        seq_length=parts["seq_length"],
        cache=parts["cache"],
        identity=parts.get("identity"),
    )


def scatter_routes(
    routes: Optional[RouteBatch],
    layout: TokenLayout,
    layer_ids: IntSeq,
    group: dist.ProcessGroup,
    src: int = 0,
) -> RouteBatch:
    """Give every rank of `group` its own route shard (the rows of `layout`, the MoE layers
    `layer_ids`) from the canonical batch on `src` (a rank within `group`; only it passes
    `routes`, the others None). Two exchanges: each rank's request to `src` (header [num_tokens,
    seq_length, L_local, code_len] + the run-length token code + its layer ids), then from `src`
    each rank's packed slice. Bytes received per rank: its slice (128 B header +
    ceil(T_r * L_r * k * ceil(log2 E) / 8) [+ masks] [+ its cache]) + 8 W for the sizes.
    Any rank's error is raised on every rank of the group (no hang)."""
    group = _check_group("scatter_routes", group)
    rank, world = group.rank(), group.size()
    error: Optional[Exception] = None
    local = None
    try:
        local = _scatter_routes(routes, layout, layer_tensor(layer_ids), group, src, rank, world)
    except ValueError as exc:
        error = exc
    raise_on_any_rank(
        error,
        group,
        f"scatter_routes: another rank of the group could not get its route shard (see its "
        f"error); rank {rank} stops too",
    )
    return local


def _scatter_routes(routes, layout, layer_ids, group, src, rank, world) -> RouteBatch:
    if not 0 <= src < world:  # the same on every rank: they all raise before any collective
        raise ValueError(f"scatter_routes: src={src} not a rank of the group (size {world})")
    code = encode_token_index(layout.token_index, layout.num_tokens, layout.seq_length)
    header = [layout.num_tokens, layout.seq_length or -1, layer_ids.numel(), code.numel()]
    request = as_bytes(torch.cat([torch.tensor(header), code, layer_ids]))
    empty = torch.empty(0, dtype=torch.uint8)
    requests = exchange_bytes([request if r == src else empty for r in range(world)], group)
    replies = [empty] * world
    error: Optional[Exception] = None
    if rank == src:
        if routes is None:
            error = ValueError(f"scatter_routes: src rank {src} was given routes=None")
        else:
            # One narrow decode of the canonical batch (uint8 ids, not int64), sliced per rank.
            dtype = torch.int16 if routes.missing is not None else None
            full = routes.decode_indices(dtype or narrowest_int_dtype(routes.num_experts))
            dropped = routes.dropped
        replies = []
        for peer, message in enumerate(requests):
            request = message.clone().view(torch.int64)
            num_tokens, seq_length, num_layers, code_len = (int(x) for x in request[:4])
            try:
                if routes is None:
                    raise error
                seq_length = None if seq_length < 0 else seq_length
                check_request(routes, num_tokens, seq_length)
                tokens = decode_token_index(request[4 : 4 + code_len])
                layers = request[4 + code_len : 4 + code_len + num_layers]
                indices, drops, cache = slice_shard(routes, full, dropped, tokens, layers)
                replies.append(
                    encode_shard(
                        indices.to(torch.int64),
                        routes.num_experts,
                        drops,
                        cache,
                        num_tokens,
                        seq_length,
                        cached_tokens=cached_tokens(routes),
                    )
                )
            except ValueError as exc:
                error = error or ValueError(f"scatter_routes: request of rank {peer}: {exc}")
                replies.append(as_bytes(_REFUSED))
    mine = exchange_bytes(replies, group)[src]
    if error is not None:
        raise error
    if mine.numel() == _REFUSED.numel() * 8:
        raise ValueError(
            f"scatter_routes: source rank {src} could not serve rank {rank}'s request "
            f"({layout.token_index.numel()} tokens, MoE layers {layer_ids.tolist()}); see the "
            f"source rank's error"
        )
    parts = decode_shard(mine)
    parts.update(token_index=layout.token_index, layer_index=layer_ids)
    parts["seq_length"] = layout.seq_length
    parts["identity"] = shard_identity(layout, layer_ids, parts["cached_tokens"])
    local = _as_routes(parts)
    check_shard(local, layout, layer_ids)
    return local


def gather_routes(
    local: RouteBatch, group: dist.ProcessGroup, dst: int = 0
) -> Optional[RouteBatch]:
    """Assemble the canonical RouteBatch on `dst` (a rank within `group`) from every rank's
    shard, in one exchange; None on the other ranks. For export and debugging: `dst` then holds
    every layer of the microbatch (re-microbatching for training uses exchange_routes).

    Shards may cover different token subsets (SP / CP) and layer subsets (PP / VPP stages);
    tokens routed by several ranks (TP peers without sequence parallelism, or data duplicated
    on purpose) must agree exactly (indices, missing and drop masks, cache), else ValueError.
    Every (token, layer) of the union of layers must be covered by some rank.
    """
    group = _check_group("gather_routes", group)
    rank, world = group.rank(), group.size()
    if not 0 <= dst < world:
        raise ValueError(f"gather_routes: dst={dst} not a rank of the group (size {world})")
    payload = _encode(local)
    empty = torch.empty(0, dtype=torch.uint8)
    received = exchange_bytes([payload if r == dst else empty for r in range(world)], group)
    if rank != dst:
        return None
    return assemble_routes([decode_shard(message) for message in received])


def exchange_routes(
    outgoing: Dict[int, Sequence[RouteBatch]], group: dist.ProcessGroup
) -> Dict[int, List[RouteBatch]]:
    """Sharded re-microbatching: send outgoing[r] (route pieces for group rank r) to every r and
    receive the pieces addressed to this rank, {source rank: [pieces]} in the sender's order.

    A piece is any RouteBatch (typically `shard_routes` of a recorded shard to the sequences
    another rank trains on, with its token ids relabelled for the destination microbatch by the
    caller); it travels bit-packed with its token and layer ids and cache. One exchange over
    `group` (e.g. the data-parallel group, whose ranks hold the same stage layers): each rank
    sends and receives only its pieces, plus 8 W bytes of sizes. Merge pieces of one microbatch
    with merge_routes."""
    group = _check_group("exchange_routes", group)
    world = group.size()
    bad = sorted(r for r in outgoing if not 0 <= r < world)
    if bad:
        raise ValueError(
            f"exchange_routes: destination ranks {bad} not in the group (size {world})"
        )
    messages = []
    for r in range(world):
        pieces = [_encode(piece) for piece in outgoing.get(r, ())]
        directory = torch.tensor([len(pieces)] + [p.numel() for p in pieces], dtype=torch.int64)
        messages.append(torch.cat([as_bytes(directory)] + pieces))
    out: Dict[int, List[RouteBatch]] = {}
    for src, message in enumerate(exchange_bytes(messages, group)):
        count = int(message[:8].clone().view(torch.int64)[0])
        sizes = message[8 : 8 * (1 + count)].clone().view(torch.int64).tolist()
        pos, pieces = 8 * (1 + count), []
        for size in sizes:
            pieces.append(_as_routes(decode_shard(message[pos : pos + size])))
            pos += size
        if pieces:
            out[src] = pieces
    return out


def merge_routes(pieces: Sequence[RouteBatch]) -> RouteBatch:
    """One canonical RouteBatch from pieces of the same microbatch that together cover every
    (token, layer) (rules of gather_routes)."""
    if not pieces:
        raise ValueError("merge_routes: no pieces")
    parts = [
        dict(
            indices=piece.indices,
            dropped=piece.dropped,
            cache=piece.cache,
            token_index=row_tokens(piece),
            layer_index=row_layers(piece),
            num_tokens=piece.num_tokens,
            num_experts=piece.num_experts,
            seq_length=piece.seq_length,
        )
        for piece in pieces
    ]
    return assemble_routes(parts)


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
