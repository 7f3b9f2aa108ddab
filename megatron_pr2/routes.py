# RouteBatch: the canonical route of one microbatch, stored bit-packed.
#
# Shapes (T = tokens, L = MoE layers, k = router top-k, E = num_experts, C = cached tokens,
# H = hidden size):
#   indices      [T, L, k]  expert id per (token, MoE layer, slot); -1 only with `missing` set
#   dropped      [T, L, k]  bool, slot dropped by the capacity factor in the recorded pass
#   token_index  [T]        canonical token id of each row (None: rows ARE canonical order 0..T-1)
#   layer_index  [L]        global MoE-layer id of each layer column (None: 0..L-1)
#   cache        PredictorCache with hidden [C, L, H], logits [C, L, E], token_index [C]
#
# Canonical token order is batch-major: token b * seq_length + s is position s of sequence b of
# the unsharded microbatch (for packed THD input: position in the packed stream). Megatron routes
# the flattened [s, b] layout, so routers translate rows through `token_index` (see context.py).
# Expert ids are packed with ceil(log2(E)) bits each: k * ceil(log2 E) / 8 bytes per token per
# layer, e.g. 7 bytes for top-8 of 128 experts instead of 32 for int32.

import functools
import math
import numbers
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from megatron_pr2.bitpack import bits_for, group_words, pack_bits, split_words, unpack_bits
from megatron_pr2.identity import LayoutIdentity, ShardIdentity

MISSING = -1
"""Expert id of every slot of a token without a route (the only negative id allowed)."""


def _is_int(value: object) -> bool:
    """True for Python / numpy integers; False for bool, float and tensors."""
    # (A plain int first: the ABC check costs microseconds, and every RouteBatch asks thrice.)
    return type(value) is int or (
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
    )


def _check_ids(
    name: str, ids: Optional[torch.Tensor], length: int, bound: Optional[int]
) -> Optional[torch.Tensor]:
    """Validate a token_index / layer_index: [length] integers, distinct, in [0, bound)."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"RouteBatch {name} must be an integer tensor, got {ids!r:.60}")
    if tuple(ids.shape) != (length,):
        raise ValueError(f"RouteBatch {name} shape {tuple(ids.shape)} != ({length},)")
    ids = ids.to(torch.int64)
    if not length:
        return ids
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (bound is not None and high >= bound):
        limit = f"[0, {bound})" if bound is not None else ">= 0"
        raise ValueError(f"RouteBatch {name} holds ids in [{low}, {high}]; they must be {limit}")
    ordered = ids.sort().values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.numel():
        raise ValueError(
            f"RouteBatch {name} lists id {int(repeated[0])} more than once (each row / column "
            f"must hold a distinct one)"
        )
    return ids


def narrowest_int_dtype(num_experts: int) -> torch.dtype:
    """Narrowest torch integer dtype that holds expert ids 0..num_experts-1."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def _select(
    values: torch.Tensor, columns: Optional[List[int]], rows: Optional[torch.Tensor]
) -> torch.Tensor:
    """values[columns][:, rows] of a layer-major [L, T, ...] tensor (None: all), one gather."""
    if columns is not None and rows is not None:
        return values[torch.tensor(columns).view(-1, 1), rows.view(1, -1)]
    if columns is not None:
        return values[columns]
    return values if rows is None else values[:, rows]


@dataclass
class PredictorCache:
    """(h_old, p_old) of the record pass for a uniformly sub-sampled subset of tokens."""

    token_index: torch.Tensor
    """[C] int64 canonical token ids of the cached tokens."""
    hidden: torch.Tensor
    """[C, L, H] router inputs h_old of the record pass."""
    logits: torch.Tensor
    """[C, L, E] live router logits p_old of the record pass (without the predictor term)."""

    def select_layers(self, columns: torch.Tensor) -> "PredictorCache":
        return replace(self, hidden=self.hidden[:, columns], logits=self.logits[:, columns])

    def select_tokens(self, mask: torch.Tensor) -> "PredictorCache":
        """Keep cached tokens where mask [C] is True."""
        return PredictorCache(self.token_index[mask], self.hidden[mask], self.logits[mask])

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.token_index, self.hidden, self.logits)
        )


class RouteBatch:
    """Canonical (or sharded) route of one microbatch: expert ids per (token, MoE layer, slot)."""

    def __init__(
        self,
        indices: torch.Tensor,
        num_experts: int,
        *,
        dropped: Optional[torch.Tensor] = None,
        token_index: Optional[torch.Tensor] = None,
        layer_index: Optional[torch.Tensor] = None,
        num_tokens: Optional[int] = None,
        seq_length: Optional[int] = None,
        cache: Optional[PredictorCache] = None,
        identity: Optional[ShardIdentity] = None,
        trusted: bool = False,
        packed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        """Validate and pack `indices` [T, L, k] (integer tensor, values in [0, num_experts)).

        Every argument is checked strictly, because a wrong type would not fail later: it would
        pack silently into other bits (a float num_experts changes the id width, a `dropped`
        value of 2 sets a neighbouring slot's bit, a duplicate token id lets the last row win).
        trusted=True (a record pass packing its own top-k: distinct ids in range, no missing
        token, distinct token ids from its layout) skips the checks that read every value.
        packed: with trusted, (pack_bits of indices, expert_counts) made already for several
        microbatches at once (records.pack_microbatches).
        """
        if indices.dim() != 3:
            raise ValueError(
                f"RouteBatch indices must be [tokens, moe_layers, k], got {tuple(indices.shape)}"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"RouteBatch indices must be an integer tensor, got {indices.dtype}")
        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"RouteBatch num_experts={num_experts!r} must be an integer >= 1")
        self.shape = tuple(indices.shape)
        self.num_experts = int(num_experts)
        self._missing = None
        if trusted:
            self._packed = (
                pack_bits(indices, bits_for(num_experts)) if packed is None else packed[0]
            )
        else:
            self._validate_and_pack(indices)
        # [L, E] int32 routed slots per (layer column, expert), counted here where the ids are
        # at hand: a replay on exactly these rows takes its dispatch plan's counts from it at
        # every routing() entry (one per mini-step of the same routes) instead of recounting.
        self.expert_counts: Optional[torch.Tensor] = None if packed is None else packed[1]
        if indices.device.type == "cpu" and self.expert_counts is None:
            L, E = self.shape[1], self.num_experts
            keys = indices  # one layer: the ids are the keys (bincount takes any integer dtype)
            if L > 1:
                keys = indices.to(torch.int64) + torch.arange(L).view(1, L, 1) * E
            keys = keys[indices >= 0] if self._missing is not None else keys.reshape(-1)
            counts = torch.bincount(keys, minlength=L * E).view(L, E)
            self.expert_counts = counts.to(torch.int32)
        self._dropped = None
        if dropped is not None:
            if dropped.dtype != torch.bool:
                raise ValueError(f"RouteBatch dropped must be a bool tensor, got {dropped.dtype}")
            if tuple(dropped.shape) != self.shape:
                raise ValueError(
                    f"RouteBatch dropped shape {tuple(dropped.shape)} != indices {self.shape}"
                )
            self._dropped = pack_bits(dropped, 1)
        if num_tokens is not None and (not _is_int(num_tokens) or num_tokens < self.shape[0]):
            raise ValueError(
                f"RouteBatch num_tokens={num_tokens!r} must be an integer >= its {self.shape[0]} "
                f"rows"
            )
        self.num_tokens = int(num_tokens) if num_tokens is not None else self.shape[0]
        if token_index is None and self.num_tokens != self.shape[0]:
            raise ValueError(
                f"RouteBatch num_tokens={self.num_tokens} with {self.shape[0]} rows needs a "
                f"token_index (canonical routes hold every token)"
            )
        if trusted:
            self.token_index = None if token_index is None else token_index.to(torch.int64)
            self.layer_index = None if layer_index is None else layer_index.to(torch.int64)
        else:
            bound = self.num_tokens
            self.token_index = _check_ids("token_index", token_index, self.shape[0], bound)
            self.layer_index = _check_ids("layer_index", layer_index, self.shape[1], None)
        if seq_length is not None and (
            not _is_int(seq_length) or seq_length < 1 or self.num_tokens % seq_length
        ):
            raise ValueError(
                f"RouteBatch seq_length={seq_length!r} must be an integer >= 1 that divides "
                f"num_tokens={self.num_tokens}"
            )
        self.seq_length = None if seq_length is None else int(seq_length)
        self.cache = cache
        # The layout and MoE layers a shard was cut for (shard_routes / scatter_routes set it;
        # canonical routes have none): routing() checks it against the rank's own layout.
        if identity is not None:
            columns = range(self.shape[1]) if layer_index is None else layer_index.tolist()
            if tuple(identity.layer_ids) != tuple(columns):
                raise ValueError(
                    f"RouteBatch identity names MoE layers {list(identity.layer_ids)}; its "
                    f"columns hold MoE layers {list(columns)}"
                )
        self.identity = identity

    def _validate_and_pack(self, indices: torch.Tensor) -> None:
        """Check every expert id (range, duplicates per slot set, whole-token missing marks)
        and pack them (and the missing mask)."""
        num_experts = self.num_experts
        if indices.numel() and (int(indices.max()) >= num_experts):
            raise ValueError(
                f"RouteBatch expert id {int(indices.max())} out of range for num_experts={num_experts}"
            )
        if indices.numel() and int(indices.min()) < MISSING:
            raise ValueError(
                f"RouteBatch expert id {int(indices.min())} is negative; only {MISSING} (in "
                f"every slot of a token) marks a missing route"
            )
        # An unsigned dtype cannot hold the marker (uint8 255 == -1 compares true).
        missing = (indices == MISSING) if indices.is_signed() else torch.zeros_like(indices).bool()
        ordered = indices.sort(dim=-1).values
        duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(dim=-1)
        if bool(duplicate.any()):
            row, column = (int(v) for v in torch.nonzero(duplicate)[0])
            raise ValueError(
                f"RouteBatch row {row}, layer column {column} names a duplicate expert "
                f"{indices[row, column].tolist()} (it would break the dispatch splits)"
            )
        if bool(missing.any()):
            if not bool((missing.all(dim=-1) | ~missing.any(dim=-1)).all()):
                raise ValueError(
                    "RouteBatch: a token is either fully missing (-1 in every slot) or not"
                )
            self._missing = pack_bits(missing[..., 0], 1)
            indices = indices.clamp(min=0)
        self._packed = pack_bits(indices, bits_for(num_experts))

    def check_tokens(self, seq_length: int, batch_size: int) -> None:
        """Raise ValueError unless these routes were recorded for an input of `batch_size`
        sequences of `seq_length` tokens (the same token count alone is not enough: routes of
        [S=8, B=2] would replay other tokens' experts on [S=4, B=4])."""
        if self.num_tokens != seq_length * batch_size or self.seq_length not in (None, seq_length):
            recorded = f"seq_length={self.seq_length}" if self.seq_length else "seq_length unknown"
            raise ValueError(
                f"RouteBatch was recorded for {self.num_tokens} tokens ({recorded}); the input "
                f"has seq_length={seq_length} x batch_size={batch_size} = "
                f"{seq_length * batch_size} tokens"
            )

    def check_layers(self, num_moe_layers: int) -> None:
        """Raise ValueError unless the layer columns fit a model with `num_moe_layers` MoE
        layers: canonical routes hold exactly one column per MoE layer, a layer shard only
        ids below num_moe_layers."""
        if self.layer_index is None:
            if self.num_layers != num_moe_layers:
                raise ValueError(
                    f"RouteBatch holds {self.num_layers} MoE-layer columns; the model has "
                    f"{num_moe_layers} MoE layers"
                )
        elif self.num_layers and int(self.layer_index.max()) >= num_moe_layers:
            raise ValueError(
                f"RouteBatch layer_index {self.layer_index.tolist()} names MoE layers the model "
                f"does not have (it has {num_moe_layers})"
            )

    # -- decoded views ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.shape[1]

    @property
    def topk(self) -> int:
        return self.shape[2]

    @property
    def indices(self) -> torch.Tensor:
        """[T, L, k] int64 expert ids (-1 for missing tokens)."""
        return self.decode_indices(torch.int64)

    def decode_indices(self, dtype: torch.dtype) -> torch.Tensor:
        """[T, L, k] expert ids in `dtype` (-1 for missing tokens: a signed dtype then)."""
        count = math.prod(self.shape)
        out = unpack_bits(self._packed, bits_for(self.num_experts), count, dtype).view(self.shape)
        if self._missing is not None:
            missing = self.missing.unsqueeze(-1).expand(self.shape)
            out = out.masked_fill(missing, -1)
        return out

    def decode_layer_major(
        self,
        dtype: torch.dtype,
        columns: Optional[List[int]] = None,
        rows: Optional[torch.Tensor] = None,
        decoded: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[L', T', k] ids of layer columns `columns` and rows `rows` (None: all) in `dtype`
        (-1 for missing tokens: a signed dtype then), one contiguous [T', k] block per column.
        decoded: decode_indices(dtype) when the caller has it (decode_many)."""
        T, L, k = self.shape
        bits = bits_for(self.num_experts)
        if bits < 8 and k % 8 == 0 and decoded is None:
            # Whole groups of 8 ids per (token, layer): gather the groups' words in layer-major
            # order and split them, with no token-major copy to transpose.
            q = k // 8
            data = torch.cat([self._packed, self._packed.new_zeros(8)])
            out = data.as_strided((L, T, q, 8), (q * bits, L * q * bits, bits, 1))
            out = _select(out, columns, rows)
            out = split_words(group_words(out), bits, dtype).view(*out.shape[:2], k)
        else:  # decode_indices marks the missing tokens
            full = self.decode_indices(dtype) if decoded is None else decoded
            # Move each (token, layer)'s k ids as the widest words that hold them exactly (E =
            # 256, k = 8: one int64 per (token, layer) instead of a byte-wise transpose).
            size, offset = k * full.element_size(), full.storage_offset() * full.element_size()
            widths = (torch.int64, torch.int32, torch.int16, full.dtype)
            wide = next(w for w in widths if size % w.itemsize == 0 and offset % w.itemsize == 0)
            words = full.view(wide).view(T, L, size // wide.itemsize).transpose(0, 1)
            return _select(words, columns, rows).contiguous().view(dtype)
        if self._missing is not None:
            out.masked_fill_(_select(self.missing.t(), columns, rows).unsqueeze(-1), -1)
        return out

    @property
    def compact_indices(self) -> torch.Tensor:
        """[T, L, k] expert ids in the narrowest integer dtype (no missing tokens allowed)."""
        if self._missing is not None:
            raise ValueError("RouteBatch has missing tokens; use .indices (int64 with -1)")
        return self.indices.to(narrowest_int_dtype(self.num_experts))

    @property
    def missing(self) -> Optional[torch.Tensor]:
        """[T, L] bool, True where a token has no route; None when every token has one."""
        if self._missing is None:
            return None
        return (
            unpack_bits(self._missing, 1, self.shape[0] * self.shape[1]).view(self.shape[:2]).bool()
        )

    @property
    def dropped(self) -> Optional[torch.Tensor]:
        """[T, L, k] bool capacity drops of the recorded pass, or None (no capacity factor)."""
        if self._dropped is None:
            return None
        return unpack_bits(self._dropped, 1, math.prod(self.shape)).view(self.shape).bool()

    @property
    def has_dropped(self) -> bool:
        """True when the route records capacity drops (without unpacking them)."""
        return self._dropped is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed route (indices plus masks), excluding the predictor cache."""
        return sum(t.numel() for t in (self._packed, self._missing, self._dropped) if t is not None)

    def rows_for(self, token_index: torch.Tensor) -> torch.Tensor:
        """Row positions in this batch of the given canonical token ids (error if one is absent)."""
        if self.token_index is None:
            if token_index.numel() and (
                token_index.min() < 0 or token_index.max() >= self.shape[0]
            ):
                raise ValueError(
                    f"RouteBatch holds tokens 0..{self.shape[0] - 1}; asked for tokens in "
                    f"[{int(token_index.min())}, {int(token_index.max())}]"
                )
            return token_index
        if token_index.numel() and (token_index.min() < 0 or token_index.max() >= self.num_tokens):
            raise ValueError(
                f"RouteBatch covers canonical tokens 0..{self.num_tokens - 1}; asked for tokens "
                f"in [{int(token_index.min())}, {int(token_index.max())}]"
            )
        position = torch.full((self.num_tokens,), -1, dtype=torch.int64)
        position[self.token_index] = torch.arange(self.shape[0])
        rows = position[token_index]
        if bool((rows < 0).any()):
            raise ValueError("RouteBatch shard does not hold every token this rank routes")
        return rows

    def columns_for(self, layer_ids: torch.Tensor) -> torch.Tensor:
        """Column positions of the given global MoE-layer ids (error if one is absent)."""
        if self.layer_index is None:
            if layer_ids.numel() and int(layer_ids.max()) >= self.shape[1]:
                raise ValueError(
                    f"RouteBatch holds {self.shape[1]} MoE layers; asked for layer {int(layer_ids.max())}"
                )
            return layer_ids
        lookup = {int(layer): col for col, layer in enumerate(self.layer_index.tolist())}
        absent = [int(layer) for layer in layer_ids.tolist() if int(layer) not in lookup]
        if absent:
            raise ValueError(f"RouteBatch has no route for MoE layers {absent}")
        return torch.tensor([lookup[int(layer)] for layer in layer_ids.tolist()], dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"RouteBatch(tokens={self.shape[0]}, moe_layers={self.shape[1]}, k={self.shape[2]}, "
            f"num_experts={self.num_experts}, bytes={self.nbytes}, "
            f"sharded={self.token_index is not None or self.layer_index is not None}, "
            f"cache={'none' if self.cache is None else self.cache.token_index.numel()}"
            + ("" if self.identity is None else f", cut for {self.identity.describe()}")
            + ")"
        )


@dataclass(frozen=True)
class TokenLayout:
    """Which canonical tokens this rank's routers see, in the routers' row order."""

    token_index: torch.Tensor
    """[T_local] int64 canonical token id of each router row (router rows are the flattened
    [s_local, b] layer input, sequence-major)."""
    num_tokens: int
    """T: tokens of the whole (unsharded) microbatch."""
    seq_length: int
    """Canonical length of one sequence (for the predictor-cache stride)."""
    identity: Optional[LayoutIdentity] = None
    """The rank split this layout was made for (layout_for_rank / local_layout set it); None
    for a layout built by hand."""

    @classmethod
    def full(cls, seq_length: int, batch_size: int) -> "TokenLayout":
        """The unsharded layout: router row s * B + b holds canonical token b * S + s."""
        s = torch.arange(seq_length).unsqueeze(1)
        b = torch.arange(batch_size).unsqueeze(0)
        token_index = (b * seq_length + s).reshape(-1)
        return cls(token_index, seq_length * batch_size, seq_length)

    def is_full(self) -> bool:
        """True when this layout covers every canonical token (a permutation of 0..T-1)."""
        return self.token_index.numel() == self.num_tokens


@functools.lru_cache(maxsize=8)
def shared_full_layout(seq_length: int, batch_size: int) -> TokenLayout:
    """TokenLayout.full shared by the routing() contexts of a run (every mini-step routes the
    same shapes): built once, not at every entry. A layout is frozen and nothing writes its
    token_index."""
    return TokenLayout.full(seq_length, batch_size)
