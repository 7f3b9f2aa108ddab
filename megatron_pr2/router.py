# PR2Router: Megatron-Core's TopKRouter plus an evolution predictor and route record/replay.
#
# Shapes: router input [S, B, H] (S local sequence length, B micro-batch size, H hidden); logits
# [S, B, E] reshaped to [T, E] with T = S * B tokens in sequence-major order; top_indices [T, k];
# probs and routing_map [T, E] as in Megatron-Core.
#
# Modes are driven by `megatron_pr2.routing(model, mode, ...)`, which hands every router of the
# model one RoutingSession (session.py). The router asks the session what to do for the current
# microbatch (a RouteAnswer) and routes itself; the session only supplies data and keeps records.
# Without a session the router IS the stock TopKRouter: forward() calls TopKRouter.forward.
# Routing itself is TopKRouter.routing (super().routing()) with Megatron's replay hook
# (`router_replay.get_replay_topk`) forcing the top-k; only replaying recorded capacity drops
# needs its own step, since TopKRouter.routing always re-decides drops from live probabilities.
#
# Hot paths: replay = gating GEMM + Megatron's replay (a gather) + one int64 copy of the narrow
# indices; no-grad predict_record = ONE GEMM with W_g + W_p (cached per weight versions) + Megatron's
# top-k. moe_router_fusion: PR2 modes take Megatron's unfused top-k (TE's fused kernel has no
# replay hook); "off" stays fused.

import copy
import functools
import logging
from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_pr2.compat import router_force_biased
from megatron_pr2.config import PR2Config
from megatron_pr2.parallel.layers import global_moe_layer_id
from megatron_pr2.predictor import (
    LinearPredictor,
    LookaheadPredictor,
    build_predictor,
    predictor_loss,
)
from megatron_pr2.profiling import pr2_range
from megatron_pr2.route_answer import Recorded, RouteAnswer
from megatron_pr2.telemetry import observe_predictor, observe_replay

_LOG = logging.getLogger(__name__)
_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}  # else the input's dtype


@functools.lru_cache(maxsize=None)
def _log_unfused_once() -> None:  # once per process, not once per router
    _LOG.info(
        "PR2: moe_router_fusion=True: in record / predict_record / replay modes the PR2 router "
        "routes through Megatron's unfused top-k (TE's fused top-k kernel has no replay hook); "
        "routing(model, 'off') keeps the fused kernel"
    )


def _gating_gemm(input, weight, bias, router_dtype) -> torch.Tensor:
    """router_gating_linear(input, weight, bias, router_dtype) for a call without gradient.
    Without Transformer Engine it is Megatron's own torch.mm / addmm (the same bits), minus the
    autograd Function (its context and saved tensors, tens of microseconds per call that only a
    backward needs); with TE, Megatron's function itself."""
    if torch.is_grad_enabled() or getattr(moe_utils, "te_general_gemm", None) is not None:
        return router_gating_linear(input, weight, bias, router_dtype)
    # (.to only where the dtype changes: the same tensors, without a no-op dispatch each.)
    flat = input.view(-1, input.shape[-1])
    flat = flat if flat.dtype == router_dtype else flat.to(router_dtype)
    weight = weight if weight.dtype == router_dtype else weight.to(router_dtype)
    if bias is None:
        output = torch.mm(flat, weight.t())
    else:
        output = torch.addmm(bias.to(router_dtype), flat, weight.t())
    return output.view(*input.shape[:-1], -1)


class _TopKOverride:
    """Duck-typed stand-in for Megatron's RouterReplay, owned by one router call (no globals).

    topk_routing_with_score_function calls get_replay_topk wherever it would run torch.topk /
    group-limited top-k; with `target` set it returns the replayed indices and the scores gathered
    at them (exactly what Megatron's REPLAY_FORWARD does), otherwise it computes and remembers.
    """

    # (Class-level annotation: one in __init__ would be evaluated on every router call.)
    top_indices: Optional[torch.Tensor]

    def __init__(self, target: Optional[torch.Tensor]) -> None:
        self.target = target
        self.top_indices = None

    def get_replay_topk(
        self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None
    ):
        if self.target is None:
            values, self.top_indices = default_compute_topk(
                scores, topk, num_groups=num_groups, group_topk=group_topk
            )
            return values, self.top_indices
        self.top_indices = self.target
        return scores.gather(1, self.target), self.target


class PR2Router(TopKRouter):
    """TopKRouter with a PR2 evolution predictor; see docs/design.md section 2 for the algorithm."""

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        pr2_config: Optional[PR2Config] = None,
        **kwargs,
    ) -> None:
        if config.moe_router_load_balancing_type in ("sinkhorn", "quantile_balancing"):
            raise ValueError(
                f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r} has "
                "no replayable top-k; PR2 supports aux_loss, seq_aux_loss, global_aux_loss, none"
            )
        if router_force_biased(config) is not None:
            raise ValueError(
                f"moe_router_force_biased={router_force_biased(config)!r} (random logit bias for "
                "benchmarks) cannot be replayed; PR2 requires it to be None"
            )
        if config.moe_router_force_load_balancing:
            raise ValueError(
                "moe_router_force_load_balancing=True (random logits) cannot be replayed"
            )
        # kwargs carries is_mtp_layer on megatron-core >= 0.17 (MoELayer passes it there only).
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.pr2_config = pr2_config if pr2_config is not None else PR2Config()
        self.predictor = build_predictor(
            self.pr2_config, config.hidden_size, config.num_moe_experts
        )
        for param in self.predictor.parameters():
            # Trained like the router weight: under sequence parallelism each TP rank sees a
            # different token shard, so Megatron all-reduces params tagged sequence_parallel.
            setattr(param, "sequence_parallel", config.sequence_parallel)
            setattr(param, "pr2_predictor", True)
        # False for the parameter-free lookahead: it gets no loss and no gradient.
        self.predictor_trainable = any(True for _ in self.predictor.parameters())
        # Set by megatron_pr2.routing(); None means stock TopKRouter behaviour.
        self.session = None
        self._moe_layer_id = self._compute_moe_layer_id()
        # PR2 modes route unfused (Megatron's top-k has the replay hook): a config copy.
        self._unfused_config = None
        if config.moe_router_fusion:
            self._unfused_config = copy.copy(config)
            self._unfused_config.moe_router_fusion = False
            _log_unfused_once()
        # predict_record under no_grad: (weight versions, W_g + W_p), see predicted_gating.
        self._fused_weight: Optional[Tuple[tuple, torch.Tensor]] = None

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self._moe_layer_id = self._compute_moe_layer_id()

    def _compute_moe_layer_id(self) -> int:
        if self.layer_number is None:
            return 0
        # megatron-core >= 0.17 numbers the layers inside the MTP block 1, 2, ... (is_mtp_layer);
        # globally they follow the decoder (0.16 numbers them num_layers + j itself).
        offset = self.config.num_layers if getattr(self, "is_mtp_layer", False) else 0
        return global_moe_layer_id(self.config, self.layer_number + offset)

    @property
    def moe_layer_id(self) -> int:
        """Global 0-based MoE-layer id (its column in a canonical RouteBatch); 0 outside a
        TransformerLayer (no layer number yet); routing() refuses models where ids collide."""
        return self._moe_layer_id

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        session = self.session
        if session is None or session.mode == "off":
            return super().forward(input, padding_mask)
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        answer = session.ask(self, input)
        if session.mode == "replay":
            with pr2_range("replay"):
                return self._replay(input, padding_mask, answer)
        with pr2_range("record"):
            if session.mode == "predict_record":
                logits = self.predicted_gating(input)
            else:
                logits = self.gating(input)
            target = None if answer.target is None else answer.target.long()  # recompute
            probs, routing_map, top_indices, dropped = self.route(
                logits, padding_mask, target, answer.dropped
            )
            if not answer.recompute:
                session.save(self, self._record(input, answer, top_indices, dropped))
        return probs, routing_map

    def _record(
        self,
        input: torch.Tensor,
        answer: RouteAnswer,
        top_indices: torch.Tensor,
        dropped: Optional[torch.Tensor],
    ) -> Recorded:
        """What this router recorded for a microbatch, with the predictor cache rows (h_old and
        p_old without the predictor) in predict_record."""
        record = Recorded(top_indices.detach(), None if dropped is None else dropped.detach())
        rows = answer.cache_rows
        if rows is not None:
            # index_select, not advanced indexing: the same rows, 5-10x faster on CPU.
            cached_hidden = input.detach().reshape(-1, input.shape[-1]).index_select(0, rows)
            if rows.numel():
                # p_old: the gating GEMM over the C cached rows only (C / T of the routing GEMM),
                # which the fused W_g + W_p GEMM of predicted_gating cannot give. Megatron's own
                # gating GEMM (TE's where installed), without gating()'s per-call weight checks.
                with torch.no_grad():
                    p_old = _gating_gemm(
                        cached_hidden, self.weight, self.bias, self._router_dtype(input)
                    )
            else:  # a rank may hold none of the cached rows
                p_old = cached_hidden.new_zeros(0, self.config.num_moe_experts)
            record.hidden, record.logits = cached_hidden, p_old
        return record

    def _replay(
        self, input: torch.Tensor, padding_mask: Optional[torch.Tensor], answer: RouteAnswer
    ):
        logits = self.gating(input)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        # The session keeps replayed indices narrow (uint8 for <= 256 experts); gather wants int64.
        target, live = answer.target.long(), None
        if answer.fill_missing:
            # missing_route_policy="fallback": tokens without a route take the live top-k.
            live = self.live_topk(flat_logits)
            target = torch.where(target < 0, live, target)
        probs, routing_map, _, _ = self.route(logits, padding_mask, target, answer.dropped)

        config = self.pr2_config
        cached = answer.cache_rows is not None and answer.cache_rows.numel() > 0
        loss = offset = live_cached = None
        if cached and (answer.train_predictor or answer.telemetry):
            live_cached = flat_logits.detach().index_select(0, answer.cache_rows)
            # Before loss_start_ministep the loss is only reported: no graph for it.
            with torch.set_grad_enabled(answer.train_predictor and torch.is_grad_enabled()):
                offset = self.predictor_offset(answer.cache_hidden)
                loss = predictor_loss(config.loss, live_cached, answer.cache_logits, offset)
        if self.training and torch.is_grad_enabled():
            if answer.train_predictor:
                # The objective is the mean over the microbatch's cached tokens; this rank holds
                # C_local of C (sequence / context parallel shards), and Megatron sums
                # sequence-parallel grads over TP: weight the local mean by C_local / C.
                probs = MoEAuxLossAutoScaler.apply(
                    probs, loss * (answer.cache_share * config.loss_coeff)
                )
            elif answer.keep_predictor_grads:
                # An exact-zero gradient, so the predictor's grad buckets fill on every step.
                params = list(self.predictor.parameters())
                zero = params[0].sum()
                for param in params[1:]:
                    zero = zero + param.sum()
                probs = MoEAuxLossAutoScaler.apply(probs, zero * 0.0)
        if answer.telemetry:
            observe_replay(
                answer.stats,
                self.topk,
                self.live_topk,
                target,
                flat_logits,
                live,
                config.telemetry_stride,
            )
            if cached:
                observe_predictor(
                    answer.stats,
                    self.topk,
                    self.live_topk,
                    live_cached,
                    answer.cache_logits,
                    offset,
                    loss,
                    target.index_select(0, answer.cache_rows),
                )
        return probs, routing_map

    def predicted_gating(self, input: torch.Tensor) -> torch.Tensor:
        """Effective logits p_old + h W_p of the predict_record pass; the predictor term carries
        no gradient (the router's own term does, if grad is enabled)."""
        if isinstance(self.predictor, (LinearPredictor, LookaheadPredictor)) and (
            not torch.is_grad_enabled()
        ):
            # The RL old-policy pass runs without grad: one GEMM with W_g + W_p instead of two
            # (exact for a zero predictor, so PR2 still starts as R2 bit for bit).
            with pr2_range("predictor"):
                weight = self.fused_gating_weight()
                return _gating_gemm(input, weight, self.bias, self._router_dtype(input))
        logits = self.gating(input)
        with torch.no_grad():
            offset = self.predictor_offset(input)
        return logits + offset.to(logits.dtype)

    def _router_dtype(self, input: torch.Tensor) -> torch.dtype:
        """The dtype of the gating GEMM, as TopKRouter.gating picks it (moe_router_dtype)."""
        return _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)

    def fused_gating_weight(self) -> torch.Tensor:
        """W_g + W_p for the no-grad predict_record GEMM, once per pair of weight versions (an
        optimizer step or load bumps them, forwards do not): one [E, H] add per context."""
        weight, predictor_weight = self.weight, self.predictor.weight
        key = (
            weight.data_ptr(),
            weight._version,
            predictor_weight.data_ptr(),
            predictor_weight._version,
        )
        if self._fused_weight is None or self._fused_weight[0] != key:
            # (no_grad entered only here: a grad-mode context per router call costs more than
            # the key check.)
            with torch.no_grad():
                fused = weight + predictor_weight.to(weight.dtype)
            self._fused_weight = (key, fused)
        return self._fused_weight[1]

    def refresh_lookahead(self) -> None:
        """Start of a predict_record pass: let a lookahead predictor observe the router weight."""
        if isinstance(self.predictor, LookaheadPredictor):
            self.predictor.refresh(self.weight)

    def predictor_offset(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted logit drift h W_p for router inputs hidden [..., H], in the logits' dtype."""
        with pr2_range("predictor"):
            return self.predictor(hidden)

    def route(
        self,
        logits: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        target: Optional[torch.Tensor] = None,
        dropped: Optional[torch.Tensor] = None,
    ):
        """TopKRouter.routing with the top-k (and capacity drops) optionally forced.

        With target=None this is the stock router; with a target it is Megatron's own routing
        replay: TopKRouter.routing runs with a replay hook that returns `target` [T, k] and the
        scores gathered at it. Under a capacity factor, recorded drops (`dropped` [T, k]) are
        re-applied instead of re-deciding them from live probabilities.

        Returns probs [T, E], routing_map [T, E], top_indices [T, k] and the drop mask [T, k]
        (None without a capacity factor).
        """
        if dropped is not None:
            return self._routing_with_recorded_drops(logits, padding_mask, target, dropped)
        override = _TopKOverride(target)
        # Plain attributes (neither parameters nor submodules): swapped in the instance dict,
        # without nn.Module.__setattr__'s checks on every router call.
        attributes = self.__dict__
        stock_replay, attributes["router_replay"] = attributes["router_replay"], override
        stock_config = attributes["config"]
        if self._unfused_config is not None:
            attributes["config"] = self._unfused_config
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            attributes["router_replay"] = stock_replay
            attributes["config"] = stock_config
        top_indices = override.top_indices
        if self.config.moe_expert_capacity_factor is not None:
            # With or without pad-to-capacity, a routed slot survives iff routing_map keeps it.
            dropped = ~routing_map.gather(1, top_indices)
        return probs, routing_map, top_indices, dropped

    def _routing_with_recorded_drops(self, logits, padding_mask, target, dropped):
        """TopKRouter.routing with its token-dropping step replaced by the recorded drops (the
        one step Megatron's replay hook cannot force); every other step is Megatron's."""
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, _, top_indices = self.topk_routing(logits, target)
        probs, routing_map = self._apply_recorded_drops(probs, top_indices, dropped)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            # The aux losses balance the LIVE router: they use its own top-k, as in Megatron.
            routing_map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask
            )
            masked = padding_mask is not None
            aux = (scores_for_aux_loss, routing_map_for_aux_loss)
            probs = self._apply_aux_loss(probs, *aux, with_padding_mask=masked)
            probs = self._apply_seq_aux_loss(probs, *aux, seq_length, bsz, with_padding_mask=masked)
            probs = self._apply_global_aux_loss(probs, *aux, with_padding_mask=masked)
        # Expert-bias counters count the tokens the experts actually receive, i.e. the replayed
        # (and post-drop) routing_map: aux-loss-free balancing reacts to the real load.
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map, top_indices, dropped

    def topk_routing(self, logits: torch.Tensor, target: Optional[torch.Tensor] = None):
        """Megatron's topk_routing_with_score_function for logits [T, E], top-k forced to
        `target` [T, k] when given; returns probs [T, E], routing_map [T, E], top_indices [T, k]."""
        override = _TopKOverride(target)
        probs, routing_map = topk_routing_with_score_function(
            logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            fused=False,
            router_replay=override,
        )
        return probs, routing_map, override.top_indices

    @torch.no_grad()
    def live_topk(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, k] experts the live router picks for logits [T, E] (same selection rule)."""
        return self.topk_routing(logits)[2]

    def _apply_recorded_drops(self, probs, top_indices, dropped):
        """Keep exactly the recorded (token, slot) pairs; pad to capacity with zero-prob tokens."""
        kept = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_indices, ~dropped)
        routing_map = kept
        if self.config.moe_pad_expert_input_to_capacity:
            # The capacity the alltoall dispatcher's preprocess pads this rank's rows to (same
            # formula, same local token count). Replay is exact only if every expert's recorded
            # kept tokens fit it, which routing() checks at entry (entry_check.check_capacity):
            # routes recorded with the tokens split differently across ranks are refused there.
            capacity = get_capacity(
                num_tokens=probs.shape[0] * self.topk,
                num_experts=self.config.num_moe_experts,
                capacity_factor=self.config.moe_expert_capacity_factor,
            )
            # Fill each expert up to capacity with the first tokens it does not serve; they carry
            # probability 0, so outputs are those of the recorded kept set.
            free = ~kept
            rank_among_free = torch.cumsum(free.int(), dim=0)
            need = (capacity - kept.sum(dim=0)).clamp(min=0)
            routing_map = kept | (free & (rank_among_free <= need))
        return probs * kept, routing_map
