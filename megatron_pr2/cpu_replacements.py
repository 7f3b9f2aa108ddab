# Function-level CPU replacements of CPU mode (megatron_pr2.cpu): megatron functions whose CUDA
# dependence is not reachable through the module's `torch` name (numpy split sizes, string dtype
# asserts, uneven gloo collectives, the SP torch-norm assert, torch.compile'd helpers), and the
# triton stub for megatron-core 0.19. Each cites its docs/cpu_notes.md item.
# Shapes: none; this file moves no model data.

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, Callable, Iterator, Optional

import torch

_ABSENT = object()

# Message of the CPU-RNG consistency check in CudaRNGStatesTracker.fork(); see _RngForkWarningFilter.
_RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


def _cpu_get_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """random._get_cuda_rng_state on CPU: the CPU default generator's state (all versions)."""
    if kwargs.get("clone"):
        return torch.get_rng_state().clone()
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """random._set_cuda_rng_state on CPU: set the CPU default generator's state (all versions)."""
    torch.set_rng_state(new_state)


def _cpu_maybe_move_tensor_to_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """moe_utils.maybe_move_tensor_to_cpu for CPU tensors (docs/cpu_notes.md item 6).

    Upstream converts only CUDA tensors, so on CPU the all-to-all split sizes stay tensors and
    gloo's all_to_all_single rejects them. Here CPU tensors asked for as numpy are converted (a
    copy, as the CUDA->CPU copy upstream would be); no stream to record on CPU.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy().copy()
    return tensor


def _make_cpu_gather_along_first_dim(original: Callable) -> Callable:
    """Uneven all-gather (output_split_sizes) as pad + all_gather_into_tensor + slice.

    gloo's all_gather needs equal sizes (docs/cpu_notes.md item 7; reached by expert-TP with ETP > 1).
    The result is bitwise what an uneven all_gather would return.
    """

    @functools.wraps(original)
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        world_size, max_size = group.size(), max(sizes)
        padded = input_.new_zeros((max_size,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((world_size * max_size,) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        chunks = [gathered[r * max_size : r * max_size + s] for r, s in enumerate(sizes)]
        return torch.cat(chunks, dim=0)

    return gather


def _make_cpu_reduce_scatter_along_first_dim(original: Callable) -> Callable:
    """Uneven reduce-scatter (input_split_sizes) as all_reduce + slice of this rank's split.

    gloo implemented no reduce_scatter in older torch releases (docs/cpu_notes.md item 7; setup.py allows
    torch >= 2.6). torch 2.13's gloo does handle uneven reduce_scatter (checked: ETP2 layouts
    pass without this wrapper), so here it only pins a version-independent, exact path:
    all_reduce + slice gives the same sums.
    """

    @functools.wraps(original)
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        rank = group.rank()
        reduced = input_.contiguous().clone()
        torch.distributed.all_reduce(reduced, group=group)
        start = sum(sizes[:rank])
        return reduced[start : start + sizes[rank]].contiguous()

    return reduce_scatter


@contextlib.contextmanager
def _tensor_cuda_is_cpu() -> Iterator[None]:
    """Within the block, Tensor.cuda() returns the tensor itself (stays on CPU).

    Used only around the two megatron functions that call `.cuda()` on tensors (docs/cpu_notes.md item 8),
    because a tensor method cannot be redirected through a module's `torch` name. The swap is
    undone on exit, so torch.Tensor is unchanged outside these calls.
    """
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _with_tensor_cuda_is_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _tensor_cuda_is_cpu():
            return fn(*args, **kwargs)

    return wrapper


def _make_cpu_clip_grad_by_total_norm_fp32(original: Callable) -> Callable:
    """clip_grad_by_total_norm_fp32 without the `grad.type() == 'torch.cuda.FloatTensor'` assert.

    The upstream decoupled-grad branch does the same scaling with a dtype-only assert, so the
    fp32 grads are routed through it (same tensors, scaled in place) in both 0.16 and 0.19
    (docs/cpu_notes.md item 11).
    """

    @functools.wraps(original)
    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if use_decoupled_grad:
            return original(parameters, max_norm, total_norm, use_decoupled_grad=True)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        with_grad = [p for p in parameters if p.grad is not None]
        for param in with_grad:
            assert param.grad.dtype == torch.float32, f"fp32 grads expected, got {param.grad.dtype}"
            param.decoupled_grad = param.grad
        try:
            return original(with_grad, max_norm, total_norm, use_decoupled_grad=True)
        finally:
            for param in with_grad:
                del param.decoupled_grad

    return clip


class _ConfigWithoutSequenceParallel:
    """Read-only view of a TransformerConfig that reports sequence_parallel=False."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name == "sequence_parallel":
            return False
        return getattr(self._config, name)


def _make_cpu_wrapped_torch_norm_new(original_new: Callable) -> Callable:
    """WrappedTorchNorm.__new__ that allows sequence parallelism (docs/cpu_notes.md item 9).

    Upstream asserts `not config.sequence_parallel` because the torch norm does not tag its
    params; with SP each TP rank sees a different token shard, so the norm's grads must be summed
    over TP. Tagging `param.sequence_parallel = True` makes finalize_model_grads do exactly that,
    as it does for the Apex/TE norms.
    """

    @functools.wraps(original_new)
    def new(cls, config, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls, config, *args, **kwargs)
        norm = original_new(cls, _ConfigWithoutSequenceParallel(config), *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(new)


class _RngForkWarningFilter(logging.Filter):
    """Drops the tracker's 'CPU RNG state changed within GPU RNG context' warning.

    On CPU the "CUDA" generator is the CPU generator, so every fork that draws random numbers
    changes the CPU state by design; the warning would fire on every weight init and dropout.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_FORK_WARNING not in record.getMessage()


def _compiled_original(value: Any) -> Optional[Callable]:
    """The eager function behind a torch.compile'd function (or staticmethod), else None."""
    if isinstance(value, staticmethod):
        original = _compiled_original(value.__func__)
        return staticmethod(original) if original is not None else None
    if isinstance(value, types.FunctionType):
        return getattr(value, "_torchdynamo_orig_callable", None)
    return None


def _run_jit_fused_functions_eagerly(_set: Callable[[Any, str, Any], None]) -> None:
    """Make Megatron's `@jit_fuser` (torch.compile) helpers run eagerly in CPU mode.

    Not a CUDA-only spot but a cost one: inductor's CPU C++ build of e.g.
    TopKRouter._apply_expert_bias (expert-bias routing) or the bias-dropout fusions costs about a
    minute per process on a 2-core machine, in every spawned rank. These helpers are small
    elementwise fusions whose eager form is the reference semantics. Already-imported megatron
    functions/methods are swapped for the original callable kept by torch.compile; modules
    imported later get megatron's own no-op `jit_fuser`.
    """
    from megatron.core import jit

    _set(jit, "jit_fuser", jit.noop_decorator)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("megatron.core"):
            continue
        for name, value in list(vars(module).items()):
            original = _compiled_original(value)
            if original is not None:
                _set(module, name, original)
            elif isinstance(value, type) and value.__module__ == module_name:
                for attr, member in list(vars(value).items()):
                    original = _compiled_original(member)
                    if original is not None:
                        _set(value, attr, original)


# ---------------------------------------------------------------------------------------------
# 0.19: `import megatron.core` needs triton (docs/cpu_notes.md item 10).
# ---------------------------------------------------------------------------------------------
_PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


class _TritonKernelUnavailable:
    """What `triton.jit` returns under the stub: importable, fails loudly if launched."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"triton kernel {self.fn.__name__} cannot run: triton is not installed "
            "(megatron_pr2 CPU mode imported it against a stub)"
        )

    __call__ = _fail

    def __getitem__(self, grid: Any) -> Callable:
        return self._fail


class _TritonStub(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        # tl.constexpr, tl.int64, ... are only used as annotations at import time.
        return object()


def _preload_paged_stash_ops_without_triton() -> None:
    """Import megatron's paged-stash triton kernels module against a triton stub.

    megatron-core 0.19 imports triton unconditionally in transformer/moe/ops/paged_stash.py, which
    `import megatron.core` reaches; the kernels are GPU-only. The stub is visible in sys.modules
    only while that one file executes, so no other module (megatron's optional `try: import
    triton`, torch's has_triton) ever sees a fake triton.
    """
    if _PAGED_STASH_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    megatron_spec = importlib.util.find_spec("megatron")
    assert megatron_spec is not None, "megatron-core is not installed"
    for location in megatron_spec.submodule_search_locations or []:
        path = os.path.join(location, "core", "transformer", "moe", "ops", "paged_stash.py")
        if os.path.exists(path):
            break
    else:
        return  # releases without this file (0.16) import fine without triton
    triton = _TritonStub("triton")
    triton.jit = lambda fn=None, **kwargs: (
        _TritonKernelUnavailable(fn) if fn is not None else _TritonKernelUnavailable
    )
    triton.language = _TritonStub("triton.language")
    saved = {name: sys.modules.get(name, _ABSENT) for name in ("triton", "triton.language")}
    sys.modules["triton"], sys.modules["triton.language"] = triton, triton.language
    try:
        spec = importlib.util.spec_from_file_location(_PAGED_STASH_OPS, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    sys.modules[_PAGED_STASH_OPS] = module
