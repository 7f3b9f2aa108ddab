# Shared helpers of the benchmarks: single-process Megatron setup, timers, robust statistics.
#
# Timers return milliseconds. On CUDA they use CUDA events around the timed callable (the
# host waits on the end event only after it is recorded, so launch overhead that the GPU hides
# is not counted twice); on CPU they use time.perf_counter. Statistics are over repeats, warm-up
# excluded: median, first and third quartile (IQR), min and max.

import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process(device: str, seed: int = 1234) -> None:
    """World of one rank in this process + Megatron parallel state with every size 1.

    device "cpu": applies megatron_pr2.cpu.apply_cpu_patches() and uses gloo. device "cuda":
    uses NCCL on GPU 0 and changes nothing in Megatron except the 0.16.1 `te_general_gemm`
    NameError without Transformer Engine (an upstream bug that also hits GPUs without TE).
    """
    if device == "cpu":
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from megatron.core.transformer.moe import moe_utils

        if "te_general_gemm" not in moe_utils.__dict__:
            moe_utils.te_general_gemm = None
    else:
        raise ValueError(f"--device={device!r}: must be 'cpu' or 'cuda'")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        # A world of one on its own free port: an inherited MASTER_PORT may be held by the
        # parent process (a test runner, a launcher) and would collide.
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Timer:
    """Times a callable in milliseconds: CUDA events on CUDA; on CPU wall or process CPU time.

    clock "cpu" (time.process_time: CPU seconds of all threads of this process) is robust on a
    shared, oversubscribed machine where wall time mostly measures the other jobs; "wall"
    (time.perf_counter) is the right clock on an idle machine.
    """

    def __init__(self, device: str, clock: str = "wall") -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"--clock={clock!r}: must be 'wall' or 'cpu'")
        self.cuda = device == "cuda"
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = self.now()
        fn()
        return (self.now() - begin) * 1e3


@dataclass
class Stats:
    """Summary of one sample (milliseconds or ratios)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        values = sorted(values)
        if len(values) == 1:
            v = values[0]
            return cls(v, v, v, v, v, 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))

    def as_dict(self) -> Dict[str, float]:
        return dict(
            median=self.median, q1=self.q1, q3=self.q3, min=self.min, max=self.max, n=self.n
        )


def run_interleaved(
    jobs: Dict[str, Callable[[], None]],
    timer: Timer,
    repeats: int,
    warmup: int,
    between: Callable[[], None] = lambda: None,
) -> Dict[str, List[float]]:
    """Round-robin timing: every round runs every job once, the start rotating per round.

    Rotating the start removes a fixed position bias (e.g. a job that always runs right after a
    memory-heavy one). `between` runs untimed after every job (zeroing grads). Returns
    name -> [ms per timed round]; the first `warmup` rounds are dropped.
    """
    names = list(jobs)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timer(jobs[name])
            between()
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def paired_ratio(times: Dict[str, List[float]], num: str, den: str) -> Stats:
    """Statistics of per-round ratios num/den (rounds are interleaved, so pairs share drift)."""
    return Stats.of([a / b for a, b in zip(times[num], times[den])])
