# Profiling ranges of PR2: NVTX on CUDA (Nsight Systems), torch.profiler labels everywhere.
#
# Every range is named "pr2/<what>" (pr2/predictor, pr2/replay, pr2/record, pr2/shard_routes,
# pr2/dispatch_plan, ...). On CUDA the range goes through Megatron-Core's nvtx helpers, which emit
# only when Megatron's NVTX profiling is on (configure_nvtx_profiling), so they cost nothing
# otherwise; torch.profiler.record_function makes the same ranges visible in CPU traces.

import functools
from typing import Optional

import torch
from megatron.core.utils import nvtx_range_pop, nvtx_range_push


@functools.lru_cache(maxsize=None)
def _use_nvtx() -> bool:
    # Asked once per process: torch.cuda.is_available() costs a few microseconds per call,
    # and the ranges open on every router call.
    return torch.cuda.is_available()


class pr2_range:
    """Open the profiling range "pr2/<name>" for the duration of a `with` block (a torch.profiler
    label only while a profiler records). A plain class, not a generator context manager: the
    router opens one or two per call, and a generator's set-up costs several microseconds."""

    __slots__ = ("label", "_function")
    # (Class-level annotation: one in __init__ would be evaluated at every range.)
    _function: Optional[torch.profiler.record_function]

    def __init__(self, name: str) -> None:
        self.label = f"pr2/{name}"
        self._function = None

    def __enter__(self) -> None:
        if torch.autograd.profiler._is_profiler_enabled:
            self._function = torch.profiler.record_function(self.label)
            self._function.__enter__()
        if _use_nvtx():
            nvtx_range_push(self.label)

    def __exit__(self, *exc) -> None:
        if _use_nvtx():
            nvtx_range_pop(self.label)
        if self._function is not None:
            self._function.__exit__(*exc)
            self._function = None
