# Where a routing() context keeps routes and predictor caches: on the host for the whole context,
# on the device only while a microbatch is in flight (docs/design.md section 6).
#
# Shapes (one microbatch, this rank): T_local router rows, L_local this rank's MoE layers (one
# column each), k top-k, C_local cached tokens routed here, H hidden, E experts.
#   HostRoutes.indices      [L_local, T_local, k]  narrowest integer dtype (int16 when -1 marks a
#                                                  missing route), layer-major: one column is one
#                                                  contiguous [T_local, k] block
#   HostRoutes.dropped      [L_local, T_local, k]  bool capacity drops, or None
#   HostRoutes.cache_rows   [C_local]              int64 router rows of the cached tokens
#   HostRoutes.cache_source (hidden [C, L_b, H], logits [C, L_b, E]): the caller's PredictorCache,
#                           read per column (cache_columns) and row (cache_select) at upload time
#
# Replay lifecycle: routing() decodes every microbatch once, on the host (session.decode). The
# first router call of microbatch m (its forward, or its activation recompute inside autograd's
# backward) uploads m and prefetches m + 1: on CUDA from pinned memory with non_blocking copies on
# a side stream (the router's stream waits on an event, never the host). Each router call consumes
# its column: the device copy of that column's cache goes at once (autograd keeps what the
# predictor's backward needs), the microbatch's indices when every column is consumed. A
# recompute uploads again (nothing stays resident between a forward and its recompute). At most
# `window` microbatches are resident; an older one is evicted and uploaded again if still needed.
#
# Records (record / predict_record) go to the host as they are made: records.py.

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_pr2.bitpack import bits_for, unpack_bits
from megatron_pr2.config import PR2Config
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout, narrowest_int_dtype


def cache_torch_dtype(config: PR2Config) -> torch.dtype:
    """The torch dtype of PR2Config.cache_dtype."""
    return torch.bfloat16 if config.cache_dtype == "bf16" else torch.float32


def nbytes(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass
class HostRoutes:
    """One microbatch's routes decoded for this rank's router rows, on the host."""

    indices: torch.Tensor  # [L_local, T_local, k] narrow
    dropped: Optional[torch.Tensor]  # [L_local, T_local, k] bool
    columns: Dict[int, int]  # global MoE-layer id -> column (first axis of indices)
    has_missing: bool = False  # some (token, layer) has no route (fallback policy only)
    cache_rows: Optional[torch.Tensor] = None  # [C_local] router rows of cached tokens
    cache_source: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # ([C, L_b, H], [C, L_b, E])
    cache_columns: Optional[List[int]] = None  # column of cache_source per local column
    cache_select: Optional[torch.Tensor] = None  # [C_local] rows of cache_source here (None: all)
    cache_share: Optional[float] = None  # C_local / C of the microbatch (token-sharding ranks)

    @property
    def has_cache(self) -> bool:
        return self.cache_rows is not None and self.cache_rows.numel() > 0

    def cache_column(self, column: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """([C_local, H], [C_local, E]) of one column in `dtype` (views where possible)."""
        hidden, logits = self.cache_source
        source = self.cache_columns[column]
        if self.cache_select is None:
            return hidden[:, source].to(dtype), logits[:, source].to(dtype)
        rows = self.cache_select
        return hidden[rows, source].to(dtype), logits[rows, source].to(dtype)


def decode_host(
    batch: RouteBatch,
    layout: TokenLayout,
    layer_ids: List[int],
    microbatch: int,
    dtype: torch.dtype,
    pin: bool,
    same_rows: bool = False,
    rows: Optional[torch.Tensor] = None,
    decoded: Optional[torch.Tensor] = None,
) -> HostRoutes:
    """`batch` decoded for the router rows of `layout` and the MoE layers `layer_ids` (ascending:
    the session's columns), indices in `dtype`; pinned for CUDA uploads when `pin`.
    same_rows: the layout's rows are the batch's rows in order (no row gather): unsharded
    routes of one sequence, or a shard replayed on the layout it was cut for.
    rows: batch.rows_for(layout.token_index) when the caller has it (session.check).
    decoded: batch.decode_indices(dtype) when the caller has it (routes.decode_many)."""
    batch_layers = batch.layer_index
    if batch_layers is None:
        position_of = {layer: layer for layer in range(batch.num_layers)}
    else:
        position_of = {layer: col for col, layer in enumerate(batch_layers.tolist())}
    absent = sorted(set(layer_ids) - set(position_of))
    if absent:
        raise ValueError(f"microbatch {microbatch}: route has no MoE layers {absent}")
    source = [position_of[layer] for layer in layer_ids]
    columns = None if source == list(range(batch.num_layers)) else source
    if same_rows:
        rows = None
    elif rows is None:
        rows = batch.rows_for(layout.token_index)

    def layer_major(values: torch.Tensor) -> torch.Tensor:
        # [T, L_b, k] -> [L_local, T_local, k]: one contiguous block per column.
        values = values.transpose(0, 1)
        if rows is None:
            return values.contiguous() if columns is None else values[columns]
        return values[torch.tensor(source).view(-1, 1), rows.view(1, -1)]

    dropped = batch.dropped
    local = HostRoutes(
        indices=batch.decode_layer_major(dtype, columns, rows, decoded),
        dropped=None if dropped is None else layer_major(dropped),
        columns={layer: col for col, layer in enumerate(layer_ids)},
    )
    if batch.cache is not None and same_rows and batch.token_index is None:
        local.cache_rows = batch.cache.token_index  # row = canonical token
    elif batch.cache is not None:
        cached_rows = cached_positions(batch.cache, layout)[0]
        # Select rows (a copy per column at upload) only if some cached tokens are not here.
        if not layout.is_full() and not bool((cached_rows >= 0).all()):
            local.cache_select = torch.nonzero(cached_rows >= 0).squeeze(1)
            cached_rows = cached_rows[local.cache_select]
        local.cache_rows = cached_rows
    if batch.cache is not None:
        local.cache_source = (batch.cache.hidden, batch.cache.logits)
        local.cache_columns = source
    if pin:  # uploaded from pinned memory (once per forward and once per recompute)
        for name in ("indices", "dropped", "cache_rows"):
            value = getattr(local, name)
            if value is not None:
                setattr(local, name, value.pin_memory())
    return local


def decode_many(batches: List[RouteBatch]) -> Optional[List[torch.Tensor]]:
    """decode_indices of every batch, in the narrowest integer dtype (the session's for routes
    without missing tokens), with ONE unpack_bits instead of a few small ops each
    (a replay entry decodes all microbatches): batches of one shape and expert count, no missing
    token, a multiple of 8 ids each (whole groups of the joint stream). None otherwise, or where
    decode_layer_major has its own grouped path (k a multiple of 8, fewer than 8 bits)."""
    first = batches[0]
    T, L, k = first.shape
    bits = bits_for(first.num_experts)
    if (
        len(batches) < 2
        or (T * L * k) % 8
        or (bits < 8 and k % 8 == 0)
        or any(b.shape != first.shape or b.num_experts != first.num_experts for b in batches)
        or any(b._missing is not None for b in batches)  # (private: no decode to ask)
    ):
        return None
    joint = torch.cat([b._packed for b in batches])
    dtype = narrowest_int_dtype(first.num_experts)
    return list(unpack_bits(joint, bits, len(batches) * T * L * k, dtype).view(-1, T, L, k))


def cached_positions(
    cache: PredictorCache, layout: TokenLayout
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router row of each cached token in `layout` (-1 if not routed here) and the mask of
    those routed here."""
    position = torch.full((layout.num_tokens,), -1, dtype=torch.int64)
    position[layout.token_index] = torch.arange(layout.token_index.numel())
    cached_rows = position[cache.token_index]
    return cached_rows, cached_rows >= 0


def recorded_counts(
    batch: RouteBatch, layout: TokenLayout, layer_ids: List[int], own_layout: bool
) -> Optional[torch.Tensor]:
    """[L_local, E] int32 routed slots per expert of the MoE layers `layer_ids` (ascending) from
    batch.expert_counts, without decoding: when `layout` routes exactly the batch's rows (a
    shard on its own token_index, or full canonical routes on a layout the session built:
    `own_layout`) and no token is missing. None otherwise (count the decoded routes)."""
    counts = getattr(batch, "expert_counts", None)  # (routes pickled before it existed)
    own_rows = layout.token_index is batch.token_index
    full = batch.token_index is None and own_layout and layout.is_full()
    if counts is None or not (own_rows or full) or batch.missing is not None:
        return None
    if batch.layer_index is None:
        return counts[layer_ids]
    position_of = {layer: col for col, layer in enumerate(batch.layer_index.tolist())}
    return counts[[position_of[layer] for layer in layer_ids]]


def reorder_rows(
    decoded: HostRoutes, old: TokenLayout, new: TokenLayout, batch: RouteBatch
) -> HostRoutes:
    """`decoded` (rows in `old` order) with rows in `new` order; both cover every token (full
    routes of B > 1 sequences decoded in canonical order at entry, routed sequence-major)."""
    old_row_of = torch.empty_like(old.token_index)
    old_row_of[old.token_index] = torch.arange(old.token_index.numel())
    rows = old_row_of[new.token_index]
    out = HostRoutes(
        indices=decoded.indices[:, rows],
        dropped=None if decoded.dropped is None else decoded.dropped[:, rows],
        columns=decoded.columns,
        has_missing=decoded.has_missing,
        cache_source=decoded.cache_source,
        cache_columns=decoded.cache_columns,
    )
    if decoded.cache_rows is not None:
        new_row_of = torch.empty_like(new.token_index)
        new_row_of[new.token_index] = torch.arange(new.token_index.numel())
        out.cache_rows = new_row_of[batch.cache.token_index]
    return out


@dataclass
class DeviceRoutes:
    """The part of one microbatch's routes that is on the device now."""

    indices: torch.Tensor  # [L_local, T_local, k]
    dropped: Optional[torch.Tensor]
    cache_rows: Optional[torch.Tensor]
    cache_hidden: List[Optional[torch.Tensor]]  # per column [C_local, H]
    cache_logits: List[Optional[torch.Tensor]]  # per column [C_local, E]
    pending: set  # columns no router call has consumed yet
    source: Optional[HostRoutes] = None  # what was uploaded
    touched: bool = False  # a router call has used it (a prefetched entry has not yet)
    ready: Optional[torch.cuda.Event] = None  # CUDA: the side-stream copies are done
    nbytes: int = 0  # bytes still held (for the memory accounting)


@dataclass
class ResidencyStats:
    """Device-equivalent bytes this context held (CPU runs count what a GPU would hold)."""

    resident_bytes: int = 0
    peak_bytes: int = 0
    uploads: int = 0  # microbatch uploads (forward, recompute and prefetch)
    peak_microbatches: int = 0


@dataclass
class Residency:
    """Per-context device residency of replayed microbatches (see the header)."""

    num_microbatches: int
    host_routes: Callable[[int], Optional[HostRoutes]]  # None: not decoded (no prefetch)
    cache_dtype: torch.dtype
    window: int = 4
    stats: ResidencyStats = field(default_factory=ResidencyStats)
    _resident: "OrderedDict[int, DeviceRoutes]" = field(default_factory=OrderedDict)
    _stream: Optional[torch.cuda.Stream] = None

    def take(self, microbatch: int, column: int, device: torch.device) -> DeviceRoutes:
        """The device routes of `microbatch` for one router call of `column`; consumes it."""
        entry = self._resident.get(microbatch)
        if (
            entry is None
            or column not in entry.pending
            or entry.source is not self.host_routes(microbatch)  # prefetched, then re-bound
        ):
            entry = self._upload(microbatch, device)
        if not entry.touched:  # first call of this upload: start copying the next microbatch
            entry.touched = True
            following = microbatch + 1
            if following < self.num_microbatches and following not in self._resident:
                host = self.host_routes(following)
                if host is not None:
                    self._upload(following, device, host)
        self._resident.move_to_end(microbatch)
        if entry.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(entry.ready)
            for tensor in (entry.indices, entry.dropped, entry.cache_rows):
                if tensor is not None:
                    tensor.record_stream(stream)
            for tensors in (entry.cache_hidden, entry.cache_logits):
                if tensors[column] is not None:
                    tensors[column].record_stream(stream)
        return entry

    def consumed(self, microbatch: int, column: int) -> None:
        """A router call of `column` is done with `microbatch`: drop what nobody needs."""
        entry = self._resident.get(microbatch)
        if entry is None or column not in entry.pending:
            return
        entry.pending.discard(column)
        freed = nbytes(entry.cache_hidden[column]) + nbytes(entry.cache_logits[column])
        entry.cache_hidden[column] = entry.cache_logits[column] = None
        entry.nbytes -= freed
        self.stats.resident_bytes -= freed
        if not entry.pending:
            self._drop(microbatch)

    def release_all(self) -> None:
        for microbatch in list(self._resident):
            self._drop(microbatch)

    # -- internals -----------------------------------------------------------------------------
    def _drop(self, microbatch: int) -> None:
        entry = self._resident.pop(microbatch)
        self.stats.resident_bytes -= entry.nbytes

    def _upload(
        self, microbatch: int, device: torch.device, host: Optional[HostRoutes] = None
    ) -> DeviceRoutes:
        if microbatch in self._resident:
            self._drop(microbatch)
        while len(self._resident) >= self.window:
            self._drop(next(iter(self._resident)))
        host = host if host is not None else self.host_routes(microbatch)
        assert host is not None, f"microbatch {microbatch} was never decoded"
        columns = range(host.indices.shape[0])
        if device.type == "cuda":
            entry = self._upload_cuda(host, device)
        else:
            # CPU: the host tensors themselves (a copy only to select cache rows), without a no-op
            # .to dispatch each; meta (the scale simulator): shape-only copies.
            def move(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return tensor if tensor is None or tensor.device == device else tensor.to(device)

            caches = (
                [host.cache_column(j, self.cache_dtype) for j in columns] if host.has_cache else []
            )
            entry = DeviceRoutes(
                indices=move(host.indices),
                dropped=move(host.dropped),
                cache_rows=move(host.cache_rows),
                cache_hidden=[move(h) for h, _ in caches] or [None] * len(columns),
                cache_logits=[move(p) for _, p in caches] or [None] * len(columns),
                pending=set(columns),
            )
        entry.source = host
        entry.nbytes = sum(
            nbytes(t) for t in (entry.indices, entry.dropped, entry.cache_rows)
        ) + sum(nbytes(t) for t in entry.cache_hidden + entry.cache_logits)
        self._resident[microbatch] = entry
        stats = self.stats
        stats.uploads += 1
        stats.resident_bytes += entry.nbytes
        stats.peak_bytes = max(stats.peak_bytes, stats.resident_bytes)
        stats.peak_microbatches = max(stats.peak_microbatches, len(self._resident))
        return entry

    def _upload_cuda(self, host: HostRoutes, device: torch.device) -> DeviceRoutes:
        """Non-blocking copies on a side stream from pinned memory (staged per column)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        columns = range(host.indices.shape[0])

        def pinned(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if tensor is None or tensor.is_pinned():
                return tensor
            # The caching host allocator keeps the staging block until the copy has run.
            return tensor.contiguous().pin_memory()

        with torch.cuda.stream(self._stream):

            def move(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                tensor = pinned(tensor)
                return None if tensor is None else tensor.to(device, non_blocking=True)

            hidden, logits = [None] * len(columns), [None] * len(columns)
            if host.has_cache:
                for j in columns:
                    h, p = host.cache_column(j, self.cache_dtype)
                    hidden[j], logits[j] = move(h), move(p)
            entry = DeviceRoutes(
                indices=move(host.indices),
                dropped=move(host.dropped),
                cache_rows=move(host.cache_rows),
                cache_hidden=hidden,
                cache_logits=logits,
                pending=set(columns),
            )
            entry.ready = torch.cuda.Event()
            entry.ready.record(self._stream)
        return entry


def own_rows(batch: RouteBatch, layout: TokenLayout) -> bool:
    """True when `layout` is a shard's own token_index, still int64 ids in range (as built; a
    tensor changed since then goes through rows_for, which raises): its rows, in order."""
    index = batch.token_index
    if index is None or layout.token_index is not index or index.dtype != torch.int64:
        return False
    low, high = torch.aminmax(index) if index.numel() else (0, 0)
    return 0 <= int(low) and int(high) < batch.num_tokens


def check_missing(batch: RouteBatch, microbatch: int, config: PR2Config) -> bool:
    """True if some (token, layer) has no route; raises unless the policy is "fallback"."""
    missing = batch.missing
    if missing is None:
        return False
    if config.missing_route_policy == "error":
        row, column = (int(v) for v in torch.nonzero(missing)[0])
        raise ValueError(
            f"microbatch {microbatch}: {int(missing.sum())} (token, layer) pairs have no route, "
            f"first at row {row}, layer column {column} (PR2Config.missing_route_policy='error')"
        )
    return True
