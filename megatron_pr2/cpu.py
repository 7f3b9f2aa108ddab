# CPU / gloo mode for Megatron-Core (tests and debugging only).
#
# Megatron-Core's MoE layer, GPTModel and pipeline schedules run forward and backward on CPU with
# the gloo backend once a handful of CUDA-only spots are patched. `apply_cpu_patches()` patches
# them; nothing here runs on import, and the call is a no-op on a machine where CUDA is available,
# so GPU behaviour never changes.
#
# How it patches (narrowest place that works; all undone by `_remove_cpu_patches()`):
#   * Module attribute `torch` of a listed set of megatron modules is replaced by `_CpuTorch`, a
#     module object that forwards every attribute to the real torch except `torch.cuda` (a CPU
#     namespace: current_device() -> cpu, no-op streams/events/synchronize/nvtx, CPU RNG state)
#     and tensor factories (torch.zeros/empty/tensor/... map device="cuda" to cpu). torch.cuda
#     itself is never modified, and unlisted modules are untouched.
#   * A few megatron functions/class attributes are replaced by CPU versions where the CUDA
#     dependence is not reachable through the module's `torch` name (numpy split sizes, string
#     dtype asserts, uneven gloo collectives, an undefined name, the SP torch-norm assert).
#   * `Tensor.cuda` is swapped for identity only while the two megatron functions that call it
#     run (tied-embedding setup under PP, broadcast_data); torch.Tensor is unchanged otherwise.
#   * Megatron's torch.compile'd `@jit_fuser` helpers run eagerly (a minute of inductor C++
#     build per process otherwise), and the RNG tracker's fork warning is filtered (see below).
#   * 0.19 without triton: one megatron file that imports triton unconditionally is loaded
#     against a stub that is visible only while that file executes.
# Shapes: none; this file moves no model data.

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["apply_cpu_patches", "cpu_patches_applied"]

_APPLIED = False
# (owner object, attribute name, original value) of every patch, in application order.
_PATCHES: List[Tuple[Any, str, Any]] = []
_MISSING = object()

# Message of the CPU-RNG consistency check in CudaRNGStatesTracker.fork(); see _RngForkWarningFilter.
_RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"

# Megatron modules whose `torch` attribute is replaced by _CpuTorch, with the CUDA-only spots each
# one reaches on the tested paths (CPU_NOTES items 1, 2, 3, 8). Modules missing in a release are
# skipped (e.g. moe_logging exists only in 0.19).
_TORCH_PROXY_MODULES = (
    # router gating weights moved to torch.cuda.current_device(); aux-loss buffers on it.
    "megatron.core.transformer.moe.router",
    # SequentialMLP/GroupedMLP buffers on current_device().
    "megatron.core.transformer.moe.experts",
    # aux-loss tracker buffers with device="cuda"; record_stream(current_stream()).
    "megatron.core.transformer.moe.moe_utils",
    # alltoall dispatcher: class-level torch.cuda.Stream() and stream/event sync for the DtoH copy.
    "megatron.core.transformer.moe.token_dispatcher",
    # shared-expert overlap stream (torch.cuda.Stream, current_stream, stream context).
    "megatron.core.transformer.moe.shared_experts",
    # 0.19: delayed-wgrad stream/event (only when enabled) and shared-expert stream waits.
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_logging",
    # column/row parallel linears allocate weights and buffers on current_device().
    "megatron.core.tensor_parallel.layers",
    # gather/reduce-scatter/all-to-all output buffers on current_device().
    "megatron.core.tensor_parallel.mappings",
    # split/gather helpers allocate on current_device().
    "megatron.core.tensor_parallel.utils",
    # CUDA RNG tracker and model_parallel_cuda_manual_seed: torch.cuda.get_rng_state/manual_seed
    # become the CPU default generator's (the tracker then forks the CPU generator, which is what
    # CPU ops draw from); also the activation-checkpoint RNG save/restore.
    "megatron.core.tensor_parallel.random",
    # broadcast_data: size buffers with device='cuda' and current_device().
    "megatron.core.tensor_parallel.data",
    # p2p: shape buffers on current_device(), torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.p2p_communication",
    # schedules: total_num_tokens = torch.zeros(..., device="cuda").
    "megatron.core.pipeline_parallel.schedules",
    # attention masks built with device="cuda".
    "megatron.core.transformer.utils",
    # float16 module / attention / layer helpers allocating on current_device().
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # optimizer/grad-norm buffers with device='cuda'; local multi-tensor l2 norm in utils.
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
    # DDP: communication stream, grad-buffer allocations on current_device().
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    # dist_checkpointing torch_dist save: torch.cuda.synchronize() before writing and
    # torch.cuda.current_device() for the write-failure all-reduce.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

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
        # The "CUDA" RNG is the CPU default generator (CPU_NOTES item 2).
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


# ---------------------------------------------------------------------------------------------
# Function-level replacements.
# ---------------------------------------------------------------------------------------------
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
    """moe_utils.maybe_move_tensor_to_cpu for CPU tensors (CPU_NOTES item 6).

    Upstream converts only CUDA tensors, so on CPU the all-to-all split sizes stay tensors and
    gloo's all_to_all_single rejects them. Here CPU tensors asked for as numpy are converted (a
    copy, as the CUDA->CPU copy upstream would be); no stream to record on CPU.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy().copy()
    return tensor


def _make_cpu_gather_along_first_dim(original: Callable) -> Callable:
    """Uneven all-gather (output_split_sizes) as pad + all_gather_into_tensor + slice.

    gloo's all_gather needs equal sizes (CPU_NOTES item 7; reached by expert-TP with ETP > 1).
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

    gloo implemented no reduce_scatter in older torch releases (CPU_NOTES item 7; setup.py allows
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

    Used only around the two megatron functions that call `.cuda()` on tensors (CPU_NOTES item 8),
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
    (CPU_NOTES item 11).
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
    """WrappedTorchNorm.__new__ that allows sequence parallelism (CPU_NOTES item 9).

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


def _run_jit_fused_functions_eagerly() -> None:
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
# 0.19: `import megatron.core` needs triton (CPU_NOTES item 10).
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
    saved = {name: sys.modules.get(name, _MISSING) for name in ("triton", "triton.language")}
    sys.modules["triton"], sys.modules["triton.language"] = triton, triton.language
    try:
        spec = importlib.util.spec_from_file_location(_PAGED_STASH_OPS, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    sys.modules[_PAGED_STASH_OPS] = module


# ---------------------------------------------------------------------------------------------
# Apply / remove.
# ---------------------------------------------------------------------------------------------
def _set(owner: Any, name: str, value: Any) -> None:
    _PATCHES.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def _import_optional(name: str) -> Optional[types.ModuleType]:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name):
            return None  # module absent in this release
        raise


def apply_cpu_patches() -> None:
    """Make Megatron-Core's MoE / GPT / pipeline code run on CPU with the gloo backend.

    Idempotent. A no-op returning immediately when `torch.cuda.is_available()`, so GPU runs are
    never affected. Call it before building models (and, on megatron-core 0.19 without triton,
    before the first `import megatron.core`).
    """
    global _APPLIED
    if torch.cuda.is_available() or _APPLIED:
        return
    _preload_paged_stash_ops_without_triton()

    cpu_torch = _CpuTorch()
    for name in _TORCH_PROXY_MODULES:
        module = _import_optional(name)
        if module is not None and module.__dict__.get("torch") is torch:
            _set(module, "torch", cpu_torch)

    # Item 2/4: the tracker's fork() swaps "CUDA" RNG states through these two helpers.
    from megatron.core.tensor_parallel import random as tp_random

    _set(tp_random, "_get_cuda_rng_state", _cpu_get_cuda_rng_state)
    _set(tp_random, "_set_cuda_rng_state", _cpu_set_cuda_rng_state)
    logging.getLogger(tp_random.__name__).addFilter(_RNG_FILTER)

    # Item 5 (0.16.1): without Transformer Engine `te_general_gemm` is never defined in
    # moe_utils, and router_gating_linear reads it -> NameError. None selects the torch.mm path.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if "te_general_gemm" not in moe_utils.__dict__:
        _set(moe_utils, "te_general_gemm", None)

    # Item 6: numpy split sizes for gloo's all_to_all_single (token_dispatcher imports by name).
    _set(moe_utils, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)
    _set(token_dispatcher, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)

    # Item 7: uneven all-gather / reduce-scatter along the first dim (expert TP, ETP > 1).
    from megatron.core.tensor_parallel import mappings

    _set(
        mappings,
        "_gather_along_first_dim",
        _make_cpu_gather_along_first_dim(mappings._gather_along_first_dim),
    )
    _set(
        mappings,
        "_reduce_scatter_along_first_dim",
        _make_cpu_reduce_scatter_along_first_dim(mappings._reduce_scatter_along_first_dim),
    )

    # Item 8: `Tensor.cuda()` in LanguageModule (tied embeddings under PP) and broadcast_data.
    import megatron.core.tensor_parallel as tensor_parallel
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import data as tp_data

    _set(
        LanguageModule,
        "setup_embeddings_and_output_layer",
        _with_tensor_cuda_is_cpu(LanguageModule.setup_embeddings_and_output_layer),
    )
    cpu_broadcast_data = _with_tensor_cuda_is_cpu(tp_data.broadcast_data)
    _set(tp_data, "broadcast_data", cpu_broadcast_data)
    _set(tensor_parallel, "broadcast_data", cpu_broadcast_data)

    # Item 9: sequence-parallel torch norms (no Apex / TE on CPU).
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _set(
        WrappedTorchNorm,
        "__new__",
        _make_cpu_wrapped_torch_norm_new(WrappedTorchNorm.__dict__["__new__"].__func__),
    )

    # Item 11: clip_grads asserts CUDA float tensors (optimizer.py imports the name).
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    cpu_clip = _make_cpu_clip_grad_by_total_norm_fp32(clip_grads.clip_grad_by_total_norm_fp32)
    _set(clip_grads, "clip_grad_by_total_norm_fp32", cpu_clip)
    if "clip_grad_by_total_norm_fp32" in mcore_optimizer.__dict__:
        _set(mcore_optimizer, "clip_grad_by_total_norm_fp32", cpu_clip)

    # Speed, not correctness: torch.compile'd helpers run eagerly (see the function).
    _run_jit_fused_functions_eagerly()

    _APPLIED = True


def cpu_patches_applied() -> bool:
    """True once apply_cpu_patches() has patched this process (never on a CUDA machine)."""
    return _APPLIED


def _remove_cpu_patches() -> None:
    """Undo every patch (for tests of the patch set itself); the triton preload stays."""
    global _APPLIED
    while _PATCHES:
        owner, name, original = _PATCHES.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    if "megatron.core.tensor_parallel.random" in sys.modules:
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_RNG_FILTER)
    _APPLIED = False


_RNG_FILTER = _RngForkWarningFilter()
