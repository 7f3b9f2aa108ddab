# The routing(..., "replay") entry agreement: before the step's first collective, every rank of
# the step learns whether any rank's routes cannot be replayed, and all of them raise the same
# RouteError naming the failing rank and its problem (no rank is left waiting in a collective).
#
# Who takes part: the ranks of the model's process-group grid, i.e. the tp x dp x cp ranks of a
# pipeline stage (they contain the stage's EP and expert-TP groups) across every pipeline stage.
# Data-parallel replicas are included: they meet in the expert all-to-all (EP spans DP ranks) and
# in the step's gradient reduction, where a replica that raised alone would leave the others
# waiting. The groups come from the routers (tp_dp_cp_group) and the model (pg_collection.pp),
# else megatron.core.parallel_state, so a pipeline stage without MoE layers joins too;
# routing(group=) replaces them with one group of the caller's choice.
#
# Cost per routing() entry: one all-gather of a fixed row of len(FIELDS) int64 per rank (over the
# world group when the stage x pipeline grid spans it, else over the stage's group and then the
# pipeline group), i.e. N x 96 bytes for N ranks, and one host copy. Only when a rank failed, one
# more MAX all-reduce of TEXT_BYTES int32 (8 KB) carries its message. Nothing grows with
# microbatches, layers or tokens.

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_pr2.parallel.collectives import gather_rows, max_over

FIELDS = (
    "rank",  # global rank
    "failed",  # 1 if this rank's own checks raised (entry_check.py)
    "microbatches",  # number of microbatch routes (-1: none given, a stage without MoE layers)
    "pending",  # pr2_step: routes left for later calls of the block (-1: not in one)
    "tp_key",  # TP group id (lowest global rank) when TP peers must hold equal routes, else -1
    "route_digest",  # digest of this rank's routes over all microbatches (TP peers compare it)
    "shard_key",  # TP x CP group id: ranks of one stage sharing microbatches (-1: no routers)
    "pp_key",  # pipeline group id: ranks of other stages sharing microbatches (-1: unknown)
    "shape_digest",  # digest of every microbatch's (tokens, seq_length, packing)
    "num_tokens",  # first microbatch's tokens (for the message)
    "seq_length",  # first microbatch's sequence length (-1: not given)
    "packing",  # first microbatch's THD packing fingerprint as an int (0: sbhd or no CP)
)
_COL = {name: i for i, name in enumerate(FIELDS)}
TEXT_BYTES = 2048


class RouteError(ValueError):
    """Routes that cannot be replayed on some rank; raised on every rank of the step."""


@dataclass
class EntryFacts:
    """One rank's contribution to the agreement (see FIELDS), and its own error if any."""

    rank: int = 0
    error: Optional[BaseException] = None
    microbatches: int = -1
    pending: int = -1
    tp_key: int = -1
    route_digest: int = 0
    shard_key: int = -1
    pp_key: int = -1
    shape_digest: int = 0
    num_tokens: int = -1
    seq_length: int = -1
    packing: int = 0

    def row(self) -> torch.Tensor:
        values = {name: getattr(self, name) for name in FIELDS if name != "failed"}
        values["failed"] = int(self.error is not None)
        return torch.tensor([values[name] for name in FIELDS], dtype=torch.int64)


def group_key(group: Any) -> int:
    """A process group's id shared by its members: its lowest global rank."""
    return min(dist.get_process_group_ranks(group))


def step_groups(tp_dp_cp: Any, pp: Any, group: Any = None) -> List[Any]:
    """The chained groups of the agreement (see the file header); [] without a distributed run."""
    if not dist.is_initialized():
        return []
    if group is not None:
        return [group]
    if tp_dp_cp is None:  # no Megatron groups known at all: every rank of the run
        return [dist.group.WORLD]
    if pp is None or dist.get_world_size(pp) == 1:
        return [tp_dp_cp]
    if dist.get_world_size(tp_dp_cp) * dist.get_world_size(pp) == dist.get_world_size():
        return [dist.group.WORLD]  # the same ranks, one collective instead of two
    return [tp_dp_cp, pp]


def _describe_shape(row: torch.Tensor) -> str:
    seq = int(row[_COL["seq_length"]])
    packing = int(row[_COL["packing"]])
    return (
        f"rank {int(row[0])}: num_tokens={int(row[_COL['num_tokens']])}, "
        f"seq_length={seq if seq >= 0 else None}, "
        + ("sbhd" if packing == 0 else f"THD packing {packing:012x}")
    )


def _first_disagreement(table: torch.Tensor, key: str, value: str) -> Optional[Tuple]:
    """(row a, row b) of the first two rows with the same `key` (>= 0) but different `value`."""
    rows = table[(table[:, _COL[key]] >= 0) & (table[:, _COL["microbatches"]] >= 0)]
    if rows.shape[0] < 2:
        return None
    _, group = torch.unique(rows[:, _COL[key]], return_inverse=True)
    order = torch.arange(rows.shape[0])
    first = torch.full((int(group.max()) + 1,), rows.shape[0]).scatter_reduce(
        0, group, order, reduce="amin"
    )
    reference = first[group]
    bad = torch.nonzero(rows[:, _COL[value]] != rows[reference, _COL[value]]).reshape(-1)
    if bad.numel() == 0:
        return None
    return rows[reference[bad[0]]], rows[bad[0]]


def verdict(table: torch.Tensor) -> Optional[Tuple[int, str]]:
    """What is wrong in the gathered [N, len(FIELDS)] table: (rank whose own message completes
    the error, or -1; message), or None when every rank can replay. Pure, so every rank
    reaches the same verdict from the same table."""
    if table.shape[0] == 1 and int(table[0, _COL["failed"]]) == 0:
        return None  # one rank (a single-process run): nothing to disagree with
    table = table[torch.argsort(table[:, 0])]
    failed = table[table[:, _COL["failed"]] != 0]
    if failed.shape[0]:
        rank = int(failed[0, 0])
        more = f" (and {failed.shape[0] - 1} more ranks)" if failed.shape[0] > 1 else ""
        return rank, f"rank {rank}{more} rejected its routes"
    for column, what in (
        ("microbatches", "routes for {} microbatches"),
        ("pending", "{} routes left for later calls of the pr2_step block"),
    ):
        have = table[table[:, _COL[column]] >= 0]
        values = have[:, _COL[column]]
        if have.shape[0] and int(values.min()) != int(values.max()):
            low, high = have[int(values.argmin())], have[int(values.argmax())]
            return -1, (
                f"ranks disagree on the step's microbatches: rank {int(low[0])} holds "
                + what.format(int(low[_COL[column]]))
                + f", rank {int(high[0])} "
                + what.format(int(high[_COL[column]]))
                + " (every rank of the step must replay the same number of microbatches)"
            )
    pair = _first_disagreement(table, "tp_key", "route_digest")
    if pair is not None:
        return -1, (
            f"tensor-parallel ranks {int(pair[0][0])} and {int(pair[1][0])} hold different "
            "routes; without sequence parallelism they route the same tokens and must replay "
            "identical routes"
        )
    for key, peers in (("shard_key", "one TP x CP group"), ("pp_key", "one pipeline")):
        pair = _first_disagreement(table, key, "shape_digest")
        if pair is not None:
            return -1, (
                f"ranks {int(pair[0][0])} and {int(pair[1][0])} share microbatches ({peers}) "
                "but hold routes cut for different microbatch shapes or packings (cu_seqlens); "
                f"first microbatch: {_describe_shape(pair[0])}; {_describe_shape(pair[1])}"
            )
    return None


def _share_text(text: str, groups: Sequence[Any]) -> str:
    """The failing rank's message on every rank: a MAX reduce where only it wrote bytes."""
    data = text.encode("utf-8", "replace")[: TEXT_BYTES - 1]
    buffer = torch.zeros(TEXT_BYTES, dtype=torch.int32)
    buffer[: len(data)] = torch.tensor(list(data), dtype=torch.int32)
    out = max_over(buffer, groups)
    return bytes(out[out > 0].to(torch.uint8).tolist()).decode("utf-8", "replace")


def agree(facts: EntryFacts, groups: Sequence[Any]) -> None:
    """Exchange every rank's facts over `groups` and raise RouteError on every rank if any rank
    failed or the ranks disagree; returns on every rank otherwise."""
    if facts.error is None and all(dist.get_world_size(group) == 1 for group in groups):
        return  # a rank alone (one process) that did not fail: the verdict without the table
    table = gather_rows(facts.row(), groups) if groups else facts.row().view(1, -1)
    found = verdict(table)
    if found is None:
        return
    rank, message = found
    if rank >= 0:
        mine = ""
        if rank == facts.rank and facts.error is not None:
            mine = f"{type(facts.error).__name__}: {facts.error}"
        message = f"{message}: {_share_text(mine, groups) if groups else mine}"
    raise RouteError(f"routing(replay): {message}") from facts.error
