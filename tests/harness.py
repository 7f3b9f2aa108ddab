# Multi-rank test harness for megatron-pr2 on CPU with the gloo backend.
#
# run_distributed(fn, world_size, ...) spawns one process per rank, runs a module-level function
# in each after torch.distributed.init_process_group("gloo"), and returns the per-rank results.
# Inside a rank, `init_megatron_parallel(...)` sets up Megatron-Core's parallel state (with the CPU
# patches) and tiny model builders give small fp32 MoE layers / GPT models for tests.
#
# Shapes (Megatron-Core conventions): hidden states [s, b, h] (sequence-major); under sequence
# parallelism each TP rank holds [s / tp, b, h]; router tokens are the flattened [s_local * b].

import contextlib
import datetime
import functools
import io
import math
import multiprocessing
import os
import queue
import re
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS

# Substrings of exceptions raised when CUDA-only Megatron code runs on a CPU-only build.
_CUDA_ONLY_MARKERS = (
    "Torch not compiled with CUDA enabled",
    "Found no NVIDIA driver",
    "NVTX functions not installed",
    "No CUDA GPUs are available",
    "No module named 'triton'",
    "torch.cuda.FloatTensor",
    "CUDA driver",
)
_CUDA_ONLY_HINT = (
    "A rank hit a CUDA-only code path on a CPU-only machine. Call "
    "megatron_pr2.cpu.apply_cpu_patches() in the rank before importing/building Megatron-Core "
    "modules (harness.init_megatron_parallel in tests/harness.py does this)."
)


class DistributedTestError(AssertionError):
    """One or more ranks failed, died, or timed out; the message holds every rank's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serialize(value: Any) -> bytes:
    # torch.save keeps tensors out of shared memory, so the payload survives the rank exiting.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _silence_known_rank_warnings() -> None:
    # Known, expected CPU-mode warnings, repeated by every rank: they would bury a real error
    # in the captured output of a failing test.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    for message in (
        ".*Apex is not installed.*",
        ".*Transformer Engine and Apex are not installed.*",
        ".*`sequence_parallel` is set to `True`, but tensor model parallel size is 1.*",
    ):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


# Inside a rank: its process-group timeout, also given to Megatron's parallel groups.
_RANK_COLLECTIVE_TIMEOUT_S: Optional[float] = None


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable,
    args: tuple,
    kwargs: dict,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    _silence_known_rank_warnings()
    global _RANK_COLLECTIVE_TIMEOUT_S
    _RANK_COLLECTIVE_TIMEOUT_S = timeout
    try:
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        value = fn(*args, **kwargs)
        results.put((rank, "ok", _serialize(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the pytest process
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _destroy_megatron_parallel_if_initialized()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


LAUNCH_TIMEOUT_S = 900.0
"""Default wall-clock limit of one launch: 4 ranks' start-up alone (spawn, imports, rendezvous)
takes over 120 s on a loaded 2-core machine, so only a real hang comes near it."""
COLLECTIVE_TIMEOUT_S = 300.0
"""Default gloo process-group timeout: a rank blocked in a collective whose peer never joins
raises by itself after this long, so a hang shows up as an error with a traceback."""
EXIT_TIMEOUT_S = 300.0
"""How long a rank that reported its result gets to exit cleanly (its atexit handlers shut down
helper processes such as the multiprocessing Manager of Megatron's torch_dist writer)."""


def _kill_tree(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL a rank and every process it started: a rank killed alone would orphan them
    (managers, resource trackers), and they keep the test run's stdout open."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    process.kill()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=10)


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout: float = LAUNCH_TIMEOUT_S,
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
    **kwargs: Any,
) -> List[Any]:
    """Run module-level `fn(*args, **kwargs)` on `world_size` gloo ranks; return their results.

    Each rank is a fresh spawned process (OMP_NUM_THREADS=1) with torch.distributed initialised
    (gloo, free localhost port, process-group timeout min(collective_timeout, timeout)). Returns
    [result of rank 0, result of rank 1, ...] (results must be picklable with torch.save).

    If any rank raises, dies, or the launch exceeds `timeout` seconds, DistributedTestError is
    raised with every failing rank's traceback; once one rank has failed, the others get a short
    grace period to report, so a peer blocked in a collective never hangs the test. Ranks that
    reported exit on their own (within EXIT_TIMEOUT_S; one that does not is an error); only ranks
    that still run after a failure or the timeout are killed, with every process they started.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    pg_timeout = min(collective_timeout, timeout)
    # Not daemons: a rank may start helper processes (Megatron's torch_dist writer does), which
    # Python forbids daemons to do; this function joins or kills every rank before it returns.
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, port, pg_timeout, fn, args, kwargs, results),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    # Children inherit the environment at start: one thread each on a 2-core machine.
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for process in processes:
            process.start()
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp

    outcomes: Dict[int, tuple] = {}
    start = time.monotonic()
    deadline = start + timeout
    grace_s = 10.0
    first_failure_at: Optional[float] = None
    timed_out = False
    not_exited: List[int] = []
    try:
        while len(outcomes) < world_size:
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if first_failure_at is not None and now > first_failure_at + grace_s:
                break
            try:
                rank, status, payload = results.get(timeout=0.2)
                outcomes[rank] = (status, payload)
                if status != "ok" and first_failure_at is None:
                    first_failure_at = time.monotonic()
                continue
            except queue.Empty:
                pass
            # A rank that exited without reporting died (segfault, os._exit, OOM kill).
            for rank, process in enumerate(processes):
                if rank not in outcomes and process.exitcode is not None:
                    # Give its queue feeder a moment: a clean exit reports before exiting.
                    time.sleep(0.2)
                    while True:
                        try:
                            r, status, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        outcomes[r] = (status, payload)
                    if rank not in outcomes:
                        outcomes[rank] = (
                            "died",
                            f"rank {rank} exited with code {process.exitcode} without a result",
                        )
                    if outcomes[rank][0] != "ok" and first_failure_at is None:
                        first_failure_at = time.monotonic()
        # Ranks that reported exit by themselves; the others are blocked or hung.
        exit_deadline = time.monotonic() + EXIT_TIMEOUT_S
        for rank, process in enumerate(processes):
            if rank in outcomes:
                process.join(timeout=max(0.0, exit_deadline - time.monotonic()))
                if process.is_alive():
                    not_exited.append(rank)
    finally:
        for process in processes:
            if process.is_alive():
                _kill_tree(process)
        for process in processes:
            process.join(timeout=10)
        results.close()

    failures = {r: o for r, o in outcomes.items() if o[0] != "ok"}
    missing = [r for r in range(world_size) if r not in outcomes]
    if not failures and not missing and not not_exited:
        return [
            torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(world_size)
        ]

    elapsed = time.monotonic() - start
    lines = [
        f"{fn.__module__}.{fn.__name__} failed on world_size={world_size} after {elapsed:.1f}s"
    ]
    if timed_out:
        lines.append(f"TIMEOUT after {timeout}s; ranks without a result were killed: {missing}")
    elif missing:
        lines.append(f"ranks killed after another rank failed (blocked in a collective): {missing}")
    if not_exited:
        lines.append(
            f"ranks {not_exited} reported a result but did not exit within {EXIT_TIMEOUT_S}s "
            f"(killed with their child processes)"
        )
    text = "\n".join(str(o[1]) for o in failures.values())
    if any(marker in text for marker in _CUDA_ONLY_MARKERS):
        lines.append(_CUDA_ONLY_HINT)
    for rank in sorted(failures):
        status, message = failures[rank]
        lines.append(f"----- rank {rank} ({status}) -----\n{message.rstrip()}")
    raise DistributedTestError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Inside a rank: Megatron parallel state and tiny models.
# ---------------------------------------------------------------------------------------------
def _destroy_megatron_parallel_if_initialized() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def init_megatron_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    cp: int = 1,
    vpp: Optional[int] = None,
    seed: int = 1234,
) -> Iterator[Any]:
    """Inside a rank: CPU patches + Megatron parallel state; yields the ProcessGroupCollection.

    Applies megatron_pr2.cpu.apply_cpu_patches(), calls parallel_state.initialize_model_parallel
    with the given sizes (etp -> expert_tensor_parallel_size; None means Megatron's default,
    equal to tp), seeds torch and the (patched) model-parallel RNG tracker with `seed`, and
    destroys the parallel state on exit, so several layouts can run in one launch.
    """
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Megatron's groups default to a 30 min timeout: use the launch's collective timeout, so a
    # rank blocked in a TP / EP / PP collective raises by itself, as on the world group.
    timeout_s = _RANK_COLLECTIVE_TIMEOUT_S or COLLECTIVE_TIMEOUT_S
    parallel_state.initialize_model_parallel(
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    try:
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        parallel_state.destroy_model_parallel()


def make_moe_config(**overrides: Any) -> Any:
    """A small fp32 MoE TransformerConfig; `overrides` are TransformerConfig fields.

    Defaults: hidden 64, ffn 128, 4 heads, 2 layers, 8 experts top-2 with the alltoall
    dispatcher, no biases, no dropout, no aux loss, parallel sizes read from the initialised
    parallel state (so call it inside init_megatron_parallel).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields: Dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=128,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        **PLAIN_CONFIG_FIELDS,
    )
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        fields.update(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
            context_parallel_size=parallel_state.get_context_parallel_world_size(),
            sequence_parallel=tp > 1,
        )
    fields.update(overrides)
    return TransformerConfig(**fields)


def moe_layer_spec(config: Any) -> Any:
    """Megatron's local (no Transformer Engine) MoE spec: SequentialMLP experts.

    Taken from get_gpt_layer_local_spec(num_experts=...).submodules.mlp, a ModuleSpec on 0.16 and
    a functools.partial on 0.19; Megatron's build_module accepts both.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=config.num_moe_experts).submodules.mlp


def build_moe_layer(
    config: Any, submodules: Any = None, pg_collection: Any = None, layer_number: int = 1
) -> Any:
    """Build a stock MoELayer from `config` (spec: `submodules` or moe_layer_spec(config)).

    `submodules` may be a full MoE spec (ModuleSpec / partial) or an MoESubmodules instance.
    pg_collection defaults to Megatron's process groups from parallel_state.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import build_module

    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if isinstance(submodules, MoESubmodules):
        return MoELayer(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
        )
    spec = submodules if submodules is not None else moe_layer_spec(config)
    if isinstance(spec, functools.partial):  # 0.19 spec form; build_module wants a ModuleSpec
        return spec(config=config, layer_number=layer_number, pg_collection=pg_collection)
    return build_module(spec, config=config, layer_number=layer_number, pg_collection=pg_collection)


def build_tiny_gpt(
    config: Any,
    vocab_size: int,
    seq_len: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    spec: Any = None,
    pg_collection: Any = None,
    **gpt_kwargs: Any,
) -> Any:
    """Build a Megatron GPTModel with the local MoE layer spec (or `spec`) for this PP stage.

    pre_process / post_process default to whether this rank is the first / last pipeline stage.
    Extra keyword arguments go to GPTModel (e.g. share_embeddings_and_output_weights).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    if spec is None:
        spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt_kwargs.setdefault("share_embeddings_and_output_weights", False)
    gpt_kwargs.setdefault("position_embedding_type", "learned_absolute")
    if pg_collection is not None:
        gpt_kwargs["pg_collection"] = pg_collection
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_len,
        pre_process=pre_process,
        post_process=post_process,
        **gpt_kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Reference comparisons: full (single-rank layout) tensors <-> this rank's shards.
# ---------------------------------------------------------------------------------------------
_LOCAL_EXPERT = re.compile(r"(^|\.)local_experts\.(\d+)\.")
_DECODER_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _is_expert_param_name(name: str) -> bool:
    return ".experts." in f".{name}"


def reference_name(model: torch.nn.Module, local_name: str, pg_collection: Any) -> str:
    """Name of parameter `local_name` of this rank's model in the full single-rank model.

    Maps local expert i to global expert ep_rank * num_local_experts + i, and (for models with a
    `decoder` TransformerBlock) local layer i to the global layer `layer_number - 1`, so pipeline
    stages map onto the full model's layer order.
    """
    name = local_name
    match = _LOCAL_EXPERT.search(name)
    if match is not None:
        config = model.config
        num_local = config.num_moe_experts // pg_collection.ep.size()
        global_expert = pg_collection.ep.rank() * num_local + int(match.group(2))
        name = name[: match.start(2)] + str(global_expert) + name[match.end(2) :]
    decoder = getattr(model, "decoder", None)
    if decoder is not None and name.startswith("decoder."):
        match = _DECODER_LAYER.search(name)
        if match is not None:
            layer_number = decoder.layers[int(match.group(2))].layer_number
            name = name[: match.start(2)] + str(layer_number - 1) + name[match.end(2) :]
    return name


def shard_reference(
    model: torch.nn.Module, local_name: str, full: torch.Tensor, pg_collection: Any
) -> torch.Tensor:
    """This rank's shard of the full tensor `full` for parameter `local_name`.

    Tensor-parallel params (`tensor_model_parallel`) are split along `partition_dim` in
    contiguous chunks over the expert-TP group (expert params) or the TP group (dense params);
    everything else is replicated. Contiguous chunks are exact for Megatron's layouts used here
    (QKV grouped per query group, non-gated MLPs); gated (GLU) fc1 would need interleaving.
    """
    param = dict(model.named_parameters())[local_name]
    if getattr(param, "tensor_model_parallel", False):
        group = pg_collection.expt_tp if _is_expert_param_name(local_name) else pg_collection.tp
        full = full.chunk(group.size(), dim=param.partition_dim)[group.rank()]
    assert full.shape == param.shape, f"{local_name}: shard {full.shape} vs param {param.shape}"
    return full


@torch.no_grad()
def load_reference_weights(
    model: torch.nn.Module, full_state: Dict[str, torch.Tensor], pg_collection: Any
) -> Dict[str, str]:
    """Copy this rank's shards of a full single-rank state (name -> tensor) into `model`.

    Returns local name -> reference name for every parameter (all must be found).
    """
    names = {}
    for local_name, param in model.named_parameters():
        ref_name = reference_name(model, local_name, pg_collection)
        assert ref_name in full_state, f"{local_name} -> {ref_name} missing in reference state"
        param.copy_(shard_reference(model, local_name, full_state[ref_name], pg_collection))
        names[local_name] = ref_name
    return names


def allreduce_grads_like_ddp(model: torch.nn.Module, pg_collection: Any) -> None:
    """Sum `.grad` over the ranks that saw other tokens, as Megatron DDP + finalize would.

    Expert params (`allreduce` False) over the expert-data-parallel group, others over the
    data-parallel group (with CP); params tagged `sequence_parallel` also over TP. Sums, not
    averages: compare with a reference loss summed over the whole global batch.
    """
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if getattr(param, "allreduce", True):
            torch.distributed.all_reduce(param.grad, group=pg_collection.dp_cp)
        else:
            torch.distributed.all_reduce(param.grad, group=pg_collection.expt_dp)
        if getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=pg_collection.tp)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    assert actual.shape == expected.shape, f"{actual.shape} vs {expected.shape}"
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def pr2_moe_submodules(config: Any, pr2_config: Any = None) -> Any:
    """MoESubmodules of the local GPT layer spec with PR2 routers (apply_pr2)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_pr2 import PR2Config, apply_pr2
    from megatron_pr2.compat import moe_submodules_of

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    spec = apply_pr2(spec, pr2_config if pr2_config is not None else PR2Config())
    return moe_submodules_of(spec.submodules.mlp)


def build_pr2_moe_layer(
    config: Any, pr2_config: Any = None, pg_collection: Any = None, layer_number: int = 1
) -> Any:
    """An MoELayer of `config` whose router is a PR2Router (local spec, apply_pr2)."""
    return build_moe_layer(
        config, pr2_moe_submodules(config, pr2_config), pg_collection, layer_number
    )
