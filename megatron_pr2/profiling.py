# Profiling ranges of PR2: NVTX on CUDA (Nsight Systems), torch.profiler labels everywhere.
#
# Every range is named "pr2/<what>" (pr2/predictor, pr2/replay, pr2/record, pr2/shard_routes,
# pr2/dispatch_plan, ...). On CUDA the range goes through Megatron-Core's nvtx helpers, which emit
# only when Megatron's NVTX profiling is on (configure_nvtx_profiling), so they cost nothing
# otherwise; torch.profiler.record_function makes the same ranges visible in CPU traces.

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from megatron.core.utils import nvtx_range_pop, nvtx_range_push


@contextmanager
def pr2_range(name: str) -> Iterator[None]:
    """Open the profiling range "pr2/<name>" for the duration of the block (a torch.profiler
    label only while a profiler records: the label costs a few microseconds per router call)."""
    label = f"pr2/{name}"
    use_nvtx = torch.cuda.is_available()
    profiled = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function(label) if profiled else nullcontext():
        if use_nvtx:
            nvtx_range_push(label)
        try:
            yield
        finally:
            if use_nvtx:
                nvtx_range_pop(label)
