# Tiny Megatron-Core MoE GPT for the RL demo: trainer (fp32) and inference-engine copy (bf16).
#
# Shapes: tokens [b, s] int64; logits [b, s, padded_vocab] (GPTModel returns batch-major logits
# when no labels are given). Every decoder layer is an MoE layer (router -> alltoall dispatcher ->
# SequentialMLP experts), so the route of one microbatch is [b * s, num_layers, topk].
#
# The engine copy is the same architecture built with bf16 parameters: the router logits, the
# attention and the experts run in bf16 there and in fp32 in the trainer, which gives real
# training-inference mismatch (different top-k for some tokens, different log-probs).

import dataclasses
import os
import re
import socket
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_pr2.checkpointing import PREDICTOR_KEY, report_absent_predictors
from megatron_pr2.compat import reset_moe_metrics
from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS


@dataclasses.dataclass
class ModelConfig:
    """Architecture of the demo policy (Megatron-Core GPTModel, all layers MoE)."""

    num_layers: int = 4
    """Decoder layers; every one is an MoE layer."""
    hidden_size: int = 128
    """Model width."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    topk: int = 2
    """Experts per token (moe_router_topk)."""
    moe_ffn_hidden_size: int = 256
    """Hidden size of each expert MLP."""
    aux_loss_coeff: float = 1e-2
    """Load-balancing aux loss coefficient (keeps experts in use, so routing stays non-trivial)."""
    token_dispatcher: str = "alltoall"
    """Megatron MoE token dispatcher ('alltoall' or 'allgather')."""
    max_sequence_length: int = 32
    """Learned position-embedding table size (>= prompt + response tokens)."""

    def __post_init__(self) -> None:
        if self.topk > self.num_experts:
            raise ValueError(
                f"ModelConfig.topk={self.topk} must be <= num_experts={self.num_experts}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"ModelConfig.token_dispatcher must be 'alltoall' or 'allgather', "
                f"got {self.token_dispatcher!r}"
            )


def default_device() -> torch.device:
    """cuda (current device) when available, else cpu. Nothing in the demo hardcodes cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(expert_parallel_size: int = 1, seed: int = 0) -> None:
    """Initialise torch.distributed and Megatron's parallel state (TP = PP = 1, EP as given).

    Uses an existing process group (torchrun, the test harness) when there is one; otherwise
    starts a world of 1 in-process (gloo on CPU, NCCL on GPU). On CPU the Megatron-Core CUDA-only
    spots are patched through megatron_pr2.cpu.apply_cpu_patches() (explicit, never on import).
    """
    if not torch.cuda.is_available():
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                world_size=1,
                rank=0,
            )
    world = dist.get_world_size()
    if world % expert_parallel_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} must divide the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_expert_model_parallel_world_size() != expert_parallel_size:
            raise ValueError(
                f"Megatron parallel state already initialised with EP="
                f"{parallel_state.get_expert_model_parallel_world_size()}, "
                f"asked for expert_parallel_size={expert_parallel_size}"
            )
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
            parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise ValueError("the RL demo supports TP = PP = 1 (EP and DP are free)")
    else:
        parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype) -> TransformerConfig:
    bf16 = params_dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.moe_ffn_hidden_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_token_dispatcher_type=cfg.token_dispatcher,
        moe_router_load_balancing_type="aux_loss" if cfg.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.aux_loss_coeff,
        moe_grouped_gemm=False,
        **PLAIN_CONFIG_FIELDS,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )


def build_gpt_model(
    cfg: ModelConfig,
    vocab_size: int,
    pr2_config=None,
    params_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> GPTModel:
    """Build the policy: stock local MoE layer spec, routers swapped by apply_pr2 (when a
    PR2Config is given), stock GPTModel. Dense parameters are identical on every rank for a
    given seed (required for data parallelism); expert weights depend on the EP rank.
    """
    reset_moe_metrics()  # Megatron's per-layer aux-loss log entries of any previous model
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    if pr2_config is not None:
        from megatron_pr2 import apply_pr2

        spec = apply_pr2(spec, pr2_config)
    model = GPTModel(
        config=transformer_config(cfg, params_dtype),
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=True,
        position_embedding_type="learned_absolute",
    )
    # Megatron's torch-norm wrapper creates LayerNorm weights in the default dtype: cast the
    # whole module so the bf16 engine is bf16 end to end.
    return model.to(device=device or default_device(), dtype=params_dtype)


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (Megatron's convention)."""
    return torch.triu(
        torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1
    ).view(1, 1, seq_length, seq_length)


def forward_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """One microbatch forward: tokens [b, s] -> logits [b, s, v] (model dtype)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, causal_mask(s, tokens.device))


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter and buffer of src into dst (casting to dst's dtypes): the
    trainer -> inference-engine weight sync, which also carries PR2 predictor state."""
    dst.load_state_dict(src.state_dict(), strict=True)


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """Megatron marks expert-parallel weights with allreduce=False."""
    return not getattr(param, "allreduce", True)


def reduce_gradients(model: torch.nn.Module) -> None:
    """Average gradients over data parallelism, as Megatron's DDP does without buckets.

    Dense parameters: sum over the data-parallel group / dp. Expert parameters: sum over the
    expert-data-parallel group / dp (not / expert-dp): each local expert already received the
    gradient of every EP rank's tokens through the all-to-all, so the sum over expert-dp ranks
    covers all dp ranks' losses once. Parameters without a gradient on this rank (a predictor
    on a step without predictor loss) contribute zeros so that every rank joins every reduce.
    """
    dp_group = parallel_state.get_data_parallel_group()
    dp = dist.get_world_size(dp_group)
    if dp == 1:
        return
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    for group, params in (
        (dp_group, [p for p in model.parameters() if p.requires_grad and not is_expert_param(p)]),
        (
            expert_dp_group,
            [p for p in model.parameters() if p.requires_grad and is_expert_param(p)],
        ),
    ):
        if not params:
            continue
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= dp
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def clip_gradients(
    model: torch.nn.Module, max_norm: float, params: Optional[Iterable[torch.nn.Parameter]] = None
) -> float:
    """Clip by the global gradient norm of `params` (default: all of model's); returns the norm
    before clipping. Every rank must call it with the same kind of subset.

    Dense gradients are identical on every rank after reduce_gradients; expert gradients are
    sharded over the expert-parallel group, so their squared norms are summed over it.
    """
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    params = [p for p in (model.parameters() if params is None else params) if p.grad is not None]
    for p in params:
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_expert_param(p):
            expert_sq += sq
        else:
            dense_sq += sq
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        ep_group = parallel_state.get_expert_model_parallel_group()
        expert_sq = expert_sq.to(default_device())
        dist.all_reduce(expert_sq, group=ep_group)
        expert_sq = expert_sq.cpu()
    total = float((dense_sq + expert_sq).sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return total


# ---------------------------------------------------------------------------------------------
# Layout-independent ("full") state dicts: local expert i of EP rank r is global expert
# r * num_local_experts + i (Megatron's numbering), so a warm start saved under one expert-
# parallel size loads under another.
# ---------------------------------------------------------------------------------------------
_EXPERT_KEY = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def _num_local_experts(model: torch.nn.Module) -> int:
    ids = {int(m.group(2)) for k in model.state_dict() if (m := _EXPERT_KEY.match(k))}
    return len(ids)


def full_state_dict(model: torch.nn.Module) -> dict:
    """State dict with expert keys renamed to global expert ids and every rank's experts
    gathered over the expert-parallel group (identical result on every rank, on CPU)."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    n_local = _num_local_experts(model)
    full, experts = {}, {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().clone()
        m = _EXPERT_KEY.match(key)
        if m:
            experts[f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}"] = value
        else:
            full[key] = value
    if ep > 1:
        gathered = [None] * ep
        dist.all_gather_object(
            gathered, experts, group=parallel_state.get_expert_model_parallel_group()
        )
        for part in gathered:
            full.update(part)
    else:
        full.update(experts)
    return full


def load_full_state_dict(model: torch.nn.Module, full: dict) -> None:
    """Load a full_state_dict() into a model of any expert-parallel size.

    Every policy entry must be present. PR2 predictor entries may be absent (a stock model's
    state, or a warm start saved with another predictor kind, e.g. `linear` loaded into
    `lowrank`): those predictors keep their zero-offset initialisation, so the run still starts
    as plain R2, and a warning says so.
    """
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    n_local = _num_local_experts(model)
    local, absent = {}, []
    for key in model.state_dict():
        m = _EXPERT_KEY.match(key)
        src = f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}" if m else key
        if src in full:
            local[key] = full[src]
        elif PREDICTOR_KEY in f".{key}":
            absent.append(key)
        else:
            raise ValueError(f"full state dict has no entry {src} (for {key})")
    model.load_state_dict(local, strict=False)
    report_absent_predictors("the initial state", absent)
