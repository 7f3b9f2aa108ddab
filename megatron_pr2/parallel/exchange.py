# Scatter / gather of route shards between the ranks of a process group: every rank receives
# only its own packed slice from the canonical batch on one source; gather rebuilds the canonical
# batch on one destination.

from typing import Any, List, Optional, Tuple

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
    shard_routes,
    slice_shard,
)
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout


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
    layer_ids = layer_tensor(layer_ids)
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
        _send(as_bytes(request), _global(group, src), group, device)
        size = _recv_size(_global(group, src), group, device)
        if size < 0:
            raise ValueError(
                f"scatter_routes: source rank {src} could not serve rank {rank}'s request "
                f"({layout.token_index.numel()} tokens, MoE layers {layer_ids.tolist()}); see the "
                f"source rank's error"
            )
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        dist.recv(buf, src=_global(group, src), group=group)
        parts = decode_shard(buf.cpu())
        local = RouteBatch(
            parts["indices"],
            parts["num_experts"],
            dropped=parts["dropped"],
            token_index=layout.token_index,
            layer_index=layer_ids,
            num_tokens=parts["num_tokens"],
            seq_length=layout.seq_length,
            cache=parts["cache"],
            identity=shard_identity(layout, layer_ids, parts["cached_tokens"]),
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
            check_request(routes, num_tokens, None if seq_length < 0 else seq_length)
            indices, dropped, cache = slice_shard(
                routes, full_indices, full_dropped, decode_token_index(code), peer_layers
            )
            payload = encode_shard(
                indices,
                routes.num_experts,
                dropped,
                cache,
                num_tokens,
                None if seq_length < 0 else seq_length,
                cached_tokens=cached_tokens(routes),
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
    payload = encode_shard(
        local.indices,
        local.num_experts,
        local.dropped,
        local.cache,
        local.num_tokens,
        local.seq_length,
        token_index=row_tokens(local),
        layer_index=row_layers(local),
    )
    if rank != dst:
        _send(payload, _global(group, dst), group, device)
        return None
    shards = []
    for peer in range(world):
        shards.append(
            decode_shard(payload)
            if peer == dst
            else decode_shard(_recv(_global(group, peer), group, device))
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
