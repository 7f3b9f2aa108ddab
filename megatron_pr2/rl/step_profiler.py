# Step-range profiling of an RL run, with Megatron-LM's flag semantics (--profile,
# --profile-step-start S, --profile-step-end E, --profile-ranks, --nvtx-ranges), so that
# launch/nsys.sh drives the demo exactly as it drives Megatron-LM's pretrain_gpt.py.
#
# Steps are the 1-based RL steps of the progress output: steps S .. E-1 are profiled. On CUDA
# the range is opened with cudaProfilerStart/Stop (nsys --capture-range=cudaProfilerApi records
# only that window) and --nvtx-ranges turns on Megatron's NVTX ranges, which carry PR2's pr2/*
# ranges. Without CUDA a torch.profiler trace of the same steps is written instead, where the
# pr2/* ranges appear as record_function labels (chrome://tracing or Perfetto opens it).

import dataclasses
import os
from typing import Callable, Optional, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Which steps and ranks to profile."""

    step_start: int = 10
    """First profiled RL step (1-based, as printed in the progress output)."""
    step_end: int = 12
    """The capture stops before this step: steps step_start .. step_end - 1 are profiled."""
    ranks: Sequence[int] = (0,)
    """Global ranks that profile (each writes its own trace on CPU)."""
    nvtx_ranges: bool = False
    """Turn on Megatron-Core's NVTX ranges (and with them PR2's) while profiling on CUDA."""

    def __post_init__(self) -> None:
        if self.step_start < 1:
            raise ValueError(f"--profile-step-start={self.step_start}: must be >= 1")
        if self.step_end <= self.step_start:
            raise ValueError(
                f"--profile-step-end={self.step_end} must be greater than "
                f"--profile-step-start={self.step_start}"
            )


class StepProfiler:
    """Call before_step(step) / after_step(step) with 1-based steps, and close() at the end."""

    def __init__(
        self,
        config: ProfileConfig,
        rank: int,
        trace_dir: str,
        log: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.config = config
        self.enabled = rank in config.ranks
        self.trace_path = os.path.join(trace_dir, f"trace_rank{rank:03d}.json")
        self.log = log or (lambda msg: None)
        self._cpu_profiler: Optional[torch.profiler.profile] = None
        self._running = False

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.config.step_start:
            return
        if torch.cuda.is_available():
            from megatron.core.utils import configure_nvtx_profiling

            if self.config.nvtx_ranges:
                configure_nvtx_profiling(True)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        else:
            self._cpu_profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
            )
            self._cpu_profiler.__enter__()
        self._running = True
        self.log(f"profiling steps {step} .. {self.config.step_end - 1}")

    def after_step(self, step: int) -> None:
        if self._running and step + 1 >= self.config.step_end:
            self.close()

    def close(self) -> None:
        """Stop a running capture (also when the run ends inside the profiled range)."""
        if not self._running:
            return
        self._running = False
        if self._cpu_profiler is None:
            from megatron.core.utils import configure_nvtx_profiling

            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            configure_nvtx_profiling(False)
            self.log("profiling stopped (cudaProfilerStop)")
            return
        self._cpu_profiler.__exit__(None, None, None)
        os.makedirs(os.path.dirname(self.trace_path), exist_ok=True)
        self._cpu_profiler.export_chrome_trace(self.trace_path)
        self._cpu_profiler = None
        self.log(f"profiler trace: {self.trace_path}")
