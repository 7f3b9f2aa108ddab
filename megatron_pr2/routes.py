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

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_pr2.config import stride_for


def bits_for(num_experts: int) -> int:
    """Bits per packed expert id (at least 1)."""
    return max(1, math.ceil(math.log2(num_experts)))


def narrowest_int_dtype(num_experts: int) -> torch.dtype:
    """Narrowest torch integer dtype that holds expert ids 0..num_experts-1."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers (< 2**bits) into a flat uint8 tensor, little-endian bit order.

    Value i occupies bits [i * bits, (i + 1) * bits) of the byte stream. For bits <= 8, eight
    values form one int64 word of exactly `bits` bytes, so packing is a few whole-tensor ops.
    """
    flat = values.reshape(-1).to(torch.int64)
    count = flat.numel()
    if bits > 8:
        # Wide ids (more than 256 experts): bit planes, slower but general.
        shifts = torch.arange(bits, device=flat.device)
        plane = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        plane = torch.cat([plane, plane.new_zeros((-plane.numel()) % 8)])
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
        return (plane.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-count) % 8)]).view(-1, 8)
    words = (flat << (torch.arange(8, device=flat.device) * bits)).sum(dim=1)
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: -(-count * bits // 8)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` values as int64."""
    if bits > 8:
        shifts = torch.arange(8, device=packed.device)
        plane = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
        weights = 1 << torch.arange(bits, device=packed.device)
        return (plane.view(count, bits) * weights).sum(dim=1)
    groups = -(-count // 8)
    data = packed.to(torch.int64)
    data = torch.cat([data, data.new_zeros(groups * bits - data.numel())]).view(groups, bits)
    words = (data << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1)
    values = (words.unsqueeze(1) >> (torch.arange(8, device=packed.device) * bits)) & (
        (1 << bits) - 1
    )
    return values.reshape(-1)[:count]


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
    ) -> None:
        """Validate and pack `indices` [T, L, k] (integer tensor, values in [0, num_experts))."""
        if indices.dim() != 3:
            raise ValueError(
                f"RouteBatch indices must be [tokens, moe_layers, k], got {tuple(indices.shape)}"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"RouteBatch indices must be an integer tensor, got {indices.dtype}")
        if num_experts < 1:
            raise ValueError(f"RouteBatch num_experts={num_experts} must be >= 1")
        self.shape = tuple(indices.shape)
        self.num_experts = int(num_experts)
        self.device = indices.device
        missing = indices < 0
        if indices.numel() and (int(indices.max()) >= num_experts):
            raise ValueError(
                f"RouteBatch expert id {int(indices.max())} out of range for num_experts={num_experts}"
            )
        ordered = indices.sort(dim=-1).values
        duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(dim=-1)
        if bool(duplicate.any()):
            row, column = (int(v) for v in torch.nonzero(duplicate)[0])
            raise ValueError(
                f"RouteBatch row {row}, layer column {column} names a duplicate expert "
                f"{indices[row, column].tolist()} (it would break the dispatch splits)"
            )
        self._missing = None
        if bool(missing.any()):
            if not bool((missing.all(dim=-1) | ~missing.any(dim=-1)).all()):
                raise ValueError(
                    "RouteBatch: a token is either fully missing (-1 in every slot) or not"
                )
            self._missing = pack_bits(missing[..., 0], 1)
        self._packed = pack_bits(indices.clamp(min=0), bits_for(num_experts))
        self._dropped = None if dropped is None else pack_bits(dropped, 1)
        if dropped is not None and tuple(dropped.shape) != self.shape:
            raise ValueError(
                f"RouteBatch dropped shape {tuple(dropped.shape)} != indices {self.shape}"
            )
        if token_index is not None and token_index.shape != (self.shape[0],):
            raise ValueError(
                f"RouteBatch token_index shape {tuple(token_index.shape)} != ({self.shape[0]},)"
            )
        if layer_index is not None and layer_index.shape != (self.shape[1],):
            raise ValueError(
                f"RouteBatch layer_index shape {tuple(layer_index.shape)} != ({self.shape[1]},)"
            )
        self.token_index = None if token_index is None else token_index.to(torch.int64)
        self.layer_index = None if layer_index is None else layer_index.to(torch.int64)
        self.num_tokens = int(num_tokens) if num_tokens is not None else self.shape[0]
        self.seq_length = seq_length
        self.cache = cache

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
        count = math.prod(self.shape)
        out = unpack_bits(self._packed, bits_for(self.num_experts), count).view(self.shape)
        if self._missing is not None:
            missing = self.missing.unsqueeze(-1).expand(self.shape)
            out = out.masked_fill(missing, -1)
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
            f"cache={'none' if self.cache is None else self.cache.token_index.numel()})"
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


def cache_rows(
    layout: TokenLayout,
    cache_tokens_per_sequence: int,
    eligible: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Router rows whose tokens the predictor cache keeps: a fixed stride along each sequence.

    eligible: [B, S] bool in canonical order (token b * S + s), True where a token may train
    the predictor (e.g. the loss mask: never padding or post-EOS tokens). The stride then runs
    over each sequence's eligible tokens, so a sequence keeps up to cache_tokens_per_sequence of
    them. Computed on the whole microbatch, so every rank of a token-split layout agrees."""
    if eligible is None:
        stride = stride_for(layout.seq_length, cache_tokens_per_sequence)
        if stride is None:
            return torch.zeros(0, dtype=torch.int64)
        position = layout.token_index % layout.seq_length
        return torch.nonzero(position % stride == 0).squeeze(1)
    eligible = eligible.detach().to("cpu", torch.bool)
    if eligible.dim() != 2 or eligible.numel() != layout.num_tokens:
        raise ValueError(
            f"routing cache_mask of shape {tuple(eligible.shape)}: expected [batch, seq] with "
            f"{layout.num_tokens} tokens (seq_length {layout.seq_length})"
        )
    if cache_tokens_per_sequence == 0:
        return torch.zeros(0, dtype=torch.int64)
    count = eligible.sum(dim=1, keepdim=True)  # [B, 1] eligible tokens per sequence
    if cache_tokens_per_sequence == -1:
        stride = torch.ones_like(count)
    else:
        stride = (-(-count // cache_tokens_per_sequence)).clamp(min=1)
    rank = torch.cumsum(eligible.long(), dim=1) - 1  # position among the eligible tokens
    keep = (eligible & (rank % stride == 0)).reshape(-1)
    return torch.nonzero(keep[layout.token_index]).squeeze(1)
