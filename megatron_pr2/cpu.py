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
#   * Multi-Latent Attention without Transformer Engine: the local core attention takes MLA's
#     k/v head dims, and 0.16's TELinear placeholder becomes a type (cpu_mla.py).
# Shapes: none; this file moves no model data.

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any, List, Optional, Tuple

import torch

from megatron_pr2.cpu_replacements import (
    _cpu_get_cuda_rng_state,
    _cpu_maybe_move_tensor_to_cpu,
    _cpu_set_cuda_rng_state,
    _make_cpu_clip_grad_by_total_norm_fp32,
    _make_cpu_gather_along_first_dim,
    _make_cpu_reduce_scatter_along_first_dim,
    _make_cpu_wrapped_torch_norm_new,
    _preload_paged_stash_ops_without_triton,
    _RngForkWarningFilter,
    _run_jit_fused_functions_eagerly,
    _with_tensor_cuda_is_cpu,
)
from megatron_pr2.cpu_torch import _CpuTorch

__all__ = ["PLAIN_CONFIG_FIELDS", "apply_cpu_patches", "cpu_patches_applied"]

PLAIN_CONFIG_FIELDS = dict(
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    gradient_accumulation_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
)
"""TransformerConfig fields shared by the tests, the benchmarks and the RL demo: no linear biases
(as in current LLMs; it also avoids an in-place bias add on a custom-Function view in
SequentialMLP experts that autograd rejects at TP = 1), no dropout (deterministic parity), and
the fusions that need Apex / Transformer Engine / CUDA off, so CPU and GPU runs use the same
unfused ops."""

_APPLIED = False
# (owner object, attribute name, original value) of every patch, in application order.
_PATCHES: List[Tuple[Any, str, Any]] = []
_MISSING = object()

# Megatron modules whose `torch` attribute is replaced by _CpuTorch, with the CUDA-only spots each
# one reaches on the tested paths (docs/cpu_notes.md items 1, 2, 3, 8). Modules missing in a release are
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

    # Item 12: Multi-Latent Attention without Transformer Engine (see cpu_mla.py).
    from megatron_pr2.cpu_mla import mla_patches

    for owner, name, value in mla_patches():
        _set(owner, name, value)

    # Speed, not correctness: torch.compile'd helpers run eagerly (see the function).
    _run_jit_fused_functions_eagerly(_set)

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
