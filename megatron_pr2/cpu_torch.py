# The torch.cuda stand-in of CPU mode (megatron_pr2.cpu): a `torch` module proxy for a listed
# set of megatron modules, whose `torch.cuda` is a CPU namespace (current_device() -> cpu, no-op
# streams / events / synchronize / nvtx, CPU RNG state) and whose tensor factories map
# device="cuda" to cpu. torch.cuda itself is never modified. docs/cpu_notes.md items 1, 2, 3, 8.
# Shapes: none; this file moves no model data.

import contextlib
import functools
import types
from typing import Any, Callable, Optional

import torch

# Tensor factories whose `device=` argument is redirected from CUDA to CPU by _CpuTorch.
_FACTORY_NAMES = (
    "arange",
    "empty",
    "empty_like",
    "eye",
    "full",
    "full_like",
    "ones",
    "ones_like",
    "rand",
    "randint",
    "randn",
    "tensor",
    "zeros",
    "zeros_like",
)


# ---------------------------------------------------------------------------------------------
# The torch.cuda stand-in.
# ---------------------------------------------------------------------------------------------
class _CpuStream:
    """No-op stand-in for torch.cuda.Stream: CPU ops run synchronously on one stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional["_CpuEvent"] = None) -> "_CpuEvent":
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """No-op stand-in for torch.cuda.Event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


_CURRENT_STREAM = _CpuStream()


def _cpu_manual_seed(seed: int) -> None:
    # Seed only the CPU default generator (torch.manual_seed would also touch other backends).
    torch.default_generator.manual_seed(int(seed))


class _CpuCudaNamespace(types.ModuleType):
    """`torch.cuda` as seen by patched megatron modules; unknown names go to the real torch.cuda."""

    def __init__(self) -> None:
        super().__init__("torch.cuda", "CPU stand-in for torch.cuda (megatron_pr2.cpu)")
        self.current_device = lambda: torch.device("cpu")
        self.current_stream = lambda device=None: _CURRENT_STREAM
        self.default_stream = lambda device=None: _CURRENT_STREAM
        self.Stream = _CpuStream
        self.Event = _CpuEvent
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.synchronize = lambda device=None: None
        self.empty_cache = lambda: None
        self.is_current_stream_capturing = lambda: False
        self.nvtx = types.SimpleNamespace(
            range_push=lambda msg: None,
            range_pop=lambda: None,
            mark=lambda msg: None,
            range=lambda *args, **kwargs: contextlib.nullcontext(),
        )
        # The "CUDA" RNG is the CPU default generator (docs/cpu_notes.md item 2).
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        self.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        self.manual_seed = _cpu_manual_seed
        self.manual_seed_all = _cpu_manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """`torch` as seen by patched megatron modules: real torch except cuda and factories."""

    def __init__(self) -> None:
        super().__init__("torch", "CPU view of torch for megatron modules (megatron_pr2.cpu)")
        self.cuda = _CpuCudaNamespace()
        for name in _FACTORY_NAMES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)
