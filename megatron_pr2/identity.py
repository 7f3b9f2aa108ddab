# Shard identity: which rank's layout a token layout, or a route shard cut for it, belongs to.
#
#   LayoutIdentity   the token split of one rank (TP / SP, CP zigzag, THD packing) and, when
#                    known, its pipeline stage; set by layout_for_rank / local_layout
#   ShardIdentity    a LayoutIdentity plus the MoE-layer ids a shard was cut for; set by
#                    shard_routes / scatter_routes / recorded routes of a sharded layout
#
# routing(..., "replay") checks a shard's identity against the rank's own layout, taken from the
# routers' process groups, so a shard handed to the wrong rank (or cut for another packing)
# raises instead of replaying another token's experts. Canonical routes need no identity: the
# session cuts them for the rank on the spot.

import hashlib
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch


def packing_fingerprint(
    cu_seqlens: Optional[Sequence[int]], cu_seqlens_padded: Optional[Sequence[int]]
) -> Optional[str]:
    """Short hash of packed-THD boundaries (None for sbhd input): equal packings, equal prints."""
    if cu_seqlens is None and cu_seqlens_padded is None:
        return None
    digest = hashlib.sha1()
    for value in (cu_seqlens, cu_seqlens_padded):
        if value is None:
            digest.update(b"-")
        else:
            digest.update(torch.as_tensor(value).to("cpu", torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:12]


def stable_hash(*values: object) -> int:
    """63-bit hash of `values`' reprs, identical in every process (Python's hash() is salted)."""
    text = "|".join(repr(v) for v in values).encode()
    return int.from_bytes(hashlib.sha1(text).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class LayoutIdentity:
    """The layout a rank's router rows follow; see parallel/layout.py for the token order."""

    tp_rank: int = 0
    """Tensor-parallel rank the layout was cut for."""
    tp_size: int = 1
    """Tensor-parallel size."""
    sequence_parallel: bool = False
    """Sequence parallelism: TP ranks route different tokens (without it, all of them)."""
    cp_rank: int = 0
    """Context-parallel rank."""
    cp_size: int = 1
    """Context-parallel size."""
    zigzag: bool = False
    """CP split into 2 * cp_size chunks, rank r holding chunks r and 2 * cp_size - 1 - r (per
    packed sequence under THD), as Megatron balances causal attention. False without CP."""
    packing: Optional[str] = None
    """packing_fingerprint of the THD boundaries (cu_seqlens / cu_seqlens_padded); None: sbhd."""
    pp_rank: Optional[int] = None
    """Pipeline stage, when known (local_layout sets it from the model's pipeline group)."""
    pp_size: Optional[int] = None
    """Pipeline size, when known."""
    vp_size: Optional[int] = None
    """Virtual pipeline stages (model chunks) of the rank, when known."""

    def token_split(self) -> Tuple[int, int, int, int, bool]:
        """What decides which tokens the rank routes: TP peers without SP route the same ones."""
        splits_tp = self.sequence_parallel and self.tp_size > 1
        tp = (self.tp_rank, self.tp_size) if splits_tp else (0, 1)
        return tp + (self.cp_rank, self.cp_size, self.zigzag and self.cp_size > 1)

    def with_stage(
        self, pp_rank: Optional[int], pp_size: Optional[int], vp_size: Optional[int]
    ) -> "LayoutIdentity":
        return replace(self, pp_rank=pp_rank, pp_size=pp_size, vp_size=vp_size)

    def describe(self, packing: bool = True) -> str:
        """Readable form; packing=False leaves out the packing (unknown to process groups)."""
        parts = [
            f"TP rank {self.tp_rank}/{self.tp_size}" + (" SP" if self.sequence_parallel else "")
        ]
        if self.cp_size > 1:
            parts.append(
                f"CP rank {self.cp_rank}/{self.cp_size}" + (" zigzag" if self.zigzag else "")
            )
        if packing:
            parts.append("sbhd" if self.packing is None else f"THD packing {self.packing}")
        if self.pp_rank is not None:
            stage = f"PP stage {self.pp_rank}/{self.pp_size}"
            parts.append(stage + (f" x {self.vp_size} virtual" if (self.vp_size or 1) > 1 else ""))
        return ", ".join(parts)


@dataclass(frozen=True)
class ShardIdentity:
    """The layout and MoE layers a route shard was cut for."""

    layout: LayoutIdentity
    """The token layout (and pipeline stage) of the rank the shard was cut for."""
    layer_ids: Tuple[int, ...]
    """Global MoE-layer ids of the shard's columns, in column order."""
    cached_tokens: Optional[int] = None
    """C: predictor-cache tokens of the whole microbatch the shard was cut from (its cache holds
    this rank's C_local of them; the predictor loss weighs its mean by C_local / C). None when
    the shard has no cache or the total is unknown."""

    def describe(self) -> str:
        return f"{self.layout.describe()}, MoE layers {list(self.layer_ids)}"


def layout_mismatch(
    shard: LayoutIdentity, own: LayoutIdentity, own_packing_known: bool
) -> Optional[str]:
    """Why a layout cut for `shard` does not fit a rank whose layout is `own` (None: it fits).
    Packing and pipeline stage are compared only where both sides know them."""
    if shard.token_split() != own.token_split():
        return "it holds another rank's tokens (TP / SP / CP split)"
    # Without CP the packing does not move tokens between ranks: every rank routes the whole row.
    if own_packing_known and shard.cp_size > 1 and shard.packing != own.packing:
        return "it was cut for another packing of the microbatch (cu_seqlens)"
    if None not in (shard.pp_rank, own.pp_rank) and (shard.pp_rank, shard.pp_size) != (
        own.pp_rank,
        own.pp_size,
    ):
        return "it was cut for another pipeline stage"
    return None
