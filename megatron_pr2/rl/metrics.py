# Step metrics of the RL loop: accumulation, reduction over ranks, TensorBoard + JSONL output.
#
# Per-layer router metrics arrive as float tensors [num_moe_layers_on_this_rank] from the
# routing handle (h.metrics); scalars arrive as (sum, count) pairs so that means over
# microbatches, mini-steps and data-parallel ranks weight every sample equally.
# Names follow Megatron's TensorBoard style: 'pr2/<metric>/layer_<l>', 'pr2/<metric>/mean',
# 'rl/<metric>', 'time/<metric>'.

import json
import os
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


class StepMetrics:
    """Accumulates one training step's metrics on this rank; `reduce` makes them global."""

    def __init__(self) -> None:
        self._sum: Dict[str, float] = defaultdict(float)
        self._count: Dict[str, float] = defaultdict(float)
        self._max: Dict[str, float] = {}

    def add(self, name: str, value, count: float = 1.0) -> None:
        """Add `value` as a sum over `count` samples (value=mean*count for a mean of count)."""
        self._sum[name] += float(value)
        self._count[name] += float(count)

    def add_max(self, name: str, value) -> None:
        value = float(value)
        self._max[name] = max(self._max.get(name, float("-inf")), value)

    def add_per_layer(self, name: str, values: torch.Tensor, ministep: int = 0) -> None:
        """One per-layer metric [L]: '<name>/layer_<l>', '<name>/mean' (mean over layers) and,
        when ministep > 0, '<name>/ministep_<i>' (and from mini-step 2 on also
        '<name>/ministep_ge2', where router drift exists). NaN entries are skipped."""
        values = values.detach().double().reshape(-1).cpu()
        for layer, v in enumerate(values.tolist()):
            if v == v:
                self.add(f"{name}/layer_{layer}", v)
        measured = values[~torch.isnan(values)]
        if measured.numel():
            self.add(f"{name}/mean", float(measured.mean()))
            if ministep > 0:
                self.add(f"{name}/ministep_{ministep}", float(measured.mean()))
            if ministep >= 2:
                self.add(f"{name}/ministep_ge2", float(measured.mean()))

    def add_layers(self, prefix: str, metrics: Dict[str, torch.Tensor], ministep: int = 0) -> None:
        """Every per-layer metric of a routing handle under '<prefix>/<name>/...'."""
        for name, values in metrics.items():
            self.add_per_layer(f"{prefix}/{name}", values, ministep)

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
        """Means (sum / count) and maxima over every rank of `group` (all ranks must call)."""
        names = sorted(self._sum)
        max_names = sorted(self._max)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # Ranks may have seen different metric names (e.g. no cached tokens on one rank):
            # agree on the union first so that every rank joins the same all-reduces.
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (names, max_names), group=group)
            names = sorted({n for g in gathered for n in g[0]})
            max_names = sorted({n for g in gathered for n in g[1]})
            sums = torch.tensor(
                [[self._sum.get(n, 0.0), self._count.get(n, 0.0)] for n in names],
                dtype=torch.float64,
            ).reshape(-1, 2)
            maxes = torch.tensor(
                [self._max.get(n, float("-inf")) for n in max_names], dtype=torch.float64
            )
            device = torch.device("cuda") if dist.get_backend(group) == "nccl" else None
            if device is not None:
                sums, maxes = sums.to(device), maxes.to(device)
            dist.all_reduce(sums, group=group)
            if maxes.numel():
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            sums, maxes = sums.cpu(), maxes.cpu()
        else:
            sums = torch.tensor(
                [[self._sum[n], self._count[n]] for n in names], dtype=torch.float64
            ).reshape(-1, 2)
            maxes = torch.tensor([self._max[n] for n in max_names], dtype=torch.float64)
        out = {}
        for n, (s, c) in zip(names, sums.tolist()):
            out[n] = s / c if c > 0 else float("nan")
        for n, m in zip(max_names, maxes.tolist()):
            out[n] = m
        return out


class MetricsWriter:
    """Writes reduced step metrics to TensorBoard and a JSONL history (rank 0 only).

    Each step is appended as one whole line with a single write, then flushed and synced, so a
    crash leaves at most a torn last line; resume drops it with a warning.
    """

    def __init__(self, log_dir: str, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.history_path = os.path.join(log_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        # On resume drop history lines of steps after the checkpoint (a killed run may have
        # logged steps it never checkpointed); TensorBoard purges them with purge_step.
        if os.path.exists(self.history_path):
            kept = [
                line for line, row in read_history(self.history_path) if row["step"] < resume_step
            ]
            tmp = self.history_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.history_path)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=log_dir, purge_step=resume_step if resume_step else None)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in sorted(metrics.items()):
            self.tb.add_scalar(name, value, step)
        self.tb.flush()
        line = json.dumps({"step": step, **metrics}) + "\n"
        with open(self.history_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_history(path: str) -> List[Tuple[str, dict]]:
    """(line, parsed row) of every complete line of a metrics.jsonl.

    A last line without its newline or not valid JSON is what a crash mid-write leaves: it is
    skipped with a warning. An unreadable line before the last one is corruption: ValueError.
    """
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)
        try:
            row = json.loads(line)
            if not line.endswith("\n"):
                raise ValueError("no newline")
        except ValueError as error:
            if not last:
                raise ValueError(f"{path}: line {number} is not a JSON metrics row ({error})")
            warnings.warn(
                f"{path}: dropping a torn last line {number} ({len(line)} characters, a crash "
                f"mid-write): {line[:80]!r}",
                stacklevel=2,
            )
            continue
        rows.append((line, row))
    return rows
