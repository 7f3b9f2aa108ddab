# The RL loop: rollout on a bf16 inference-engine copy, old-policy pass, N GRPO mini-steps with
# routing replay in one of five modes, metrics, checkpoint / resume.
#
# Shapes (per data-parallel rank): B = prompts_per_step * group_size sequences of S tokens;
# per-token arrays over targets [B, S - 1] (see rollout.py). The rollout batch is shuffled and
# split into N mini-batches (one optimizer step each, mini-step i = 1..N); each mini-batch is
# split into microbatches of `micro_batch_size` sequences. Routes are bound to microbatches:
# the engine scoring pass, the old-policy pass and the mini-steps all run the same microbatches
# in the same order, so routes_per_microbatch[j] always belongs to microbatch j.
#
# Modes (who records the route, who replays it):
#   none    stock routing everywhere (routes are recorded only to measure drift)
#   r2      old-policy pass records top-k; every mini-step replays it
#   pr2     old-policy pass records with the predictor (predict_record); mini-steps replay, the
#           predictor trains from mini-step PR2Config.loss_start_ministep on
#   r3      the engine records while scoring the rollout; old pass and mini-steps replay it
#   pr2-r3  the engine records with its (synced) predictor; old pass and mini-steps replay

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_pr2 import PR2Config, RouteBatch, predictor_param_groups, routing
from megatron_pr2.compat import clear_aux_losses_tracker
from megatron_pr2.model_index import pr2_routers
from megatron_pr2.optim import is_predictor_param, predictor_step_frozen
from megatron_pr2.phases import STRATEGIES as MODES
from megatron_pr2.phases import strategy_modes
from megatron_pr2.rl.checkpoint import checkpoint_candidates, newest_readable
from megatron_pr2.rl.grpo import PolicyLossConfig, grpo_advantages, policy_loss
from megatron_pr2.rl.metrics import MetricsWriter, StepMetrics
from megatron_pr2.rl.model import (
    ModelConfig,
    build_gpt_model,
    clip_gradients,
    copy_weights,
    default_device,
    load_full_state_dict,
    reduce_gradients,
)
from megatron_pr2.rl.rollout import generate, response_mask_of, score, used_token_mask
from megatron_pr2.rl.route_probe import RouteProbe
from megatron_pr2.rl.sft import prompt_tokens
from megatron_pr2.rl.step_profiler import ProfileConfig, StepProfiler
from megatron_pr2.rl.task import ArithmeticTask, exact_match
from megatron_pr2.rl.tokenizer import TaskTokenizer
from megatron_pr2.telemetry import topk_overlap


@dataclasses.dataclass
class RLConfig:
    """One RL run (all sizes per data-parallel rank)."""

    mode: str = "pr2"
    """Routing mode: 'none', 'r2', 'r3', 'pr2' (PR2 on R2) or 'pr2-r3' (PR2 on R3)."""
    seed: int = 0
    """Seed of the prompt stream and of sampling; runs with equal seeds see the same prompts."""
    steps: int = 30
    """Rollout batches (= outer RL steps)."""
    prompts_per_step: int = 16
    """Distinct prompts per rollout batch."""
    group_size: int = 8
    """Samples per prompt (GRPO group)."""
    num_ministeps: int = 4
    """N: optimizer steps per rollout batch; the batch is split into N mini-batches."""
    micro_batch_size: int = 0
    """Sequences per microbatch (gradient accumulation inside a mini-step); 0 = whole mini-batch."""
    lr: float = 1e-4
    """Base AdamW learning rate (predictor: lr * pr2.alpha)."""
    weight_decay: float = 0.0
    """AdamW weight decay of non-predictor parameters."""
    router_lr_mult: float = 1.0
    """Learning-rate multiplier of the MoE router weights (a router that moves faster than the
    rest of the policy: more expert changes per update at a policy-safe lr)."""
    router_weight_decay: Optional[float] = None
    """AdamW (decoupled) weight decay of the router weights; None = weight_decay. A large value
    keeps the router logits small, so their margins stay comparable to one update's change."""
    router_anchor: float = 0.0
    """Decoupled pull of the router weights towards their warm-start values: after every
    optimizer step w -= router lr x router_anchor x (w - w_warm_start). Unlike weight decay (a
    pull towards 0) it keeps route changes from accumulating over a run: the router keeps
    moving at every update but stays near the routing the experts were trained with."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    lr_warmup_iters: int = 0
    """Optimizer steps of linear learning-rate warmup of the policy (Megatron's
    --lr-warmup-iters). Adam's first steps move every weight by ~lr whatever the gradient's
    size; a warmup keeps the first updates of the warm start small."""
    lr_decay_style: str = "constant"
    """'constant' or 'cosine' (from lr to min_lr_ratio x lr over the optimizer steps after the
    warmup; Megatron's --lr-decay-style). The predictor's lr is not scheduled: it tracks the
    router's drift at alpha x lr at every step (the predictor lab replays it so)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine decay, as a fraction of lr (Megatron's --min-lr / --lr)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout."""
    engine_dtype: str = "bf16"
    """Parameter dtype of the inference-engine copy: 'bf16' (real train-inference mismatch) or
    'fp32' (same numerics as the trainer)."""
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """Clipped objective (token-level PPO/GRPO or sequence-level GSPO)."""
    pr2: PR2Config = dataclasses.field(default_factory=PR2Config)
    """Predictor settings (used by every mode's model; only pr2 modes train the predictor)."""
    checkpoint_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end of train())."""
    save_checkpoints: bool = True
    """Write checkpoints at all (False: a comparison run that will never resume)."""
    eval_problems: int = 0
    """Greedy-decoding exact-match evaluation on this many fixed held-out problems after the
    run (0 = off)."""
    lab_dump_fraction: float = 0.0
    """Fraction of the watched tokens whose (h_old, p_old, p_live per mini-step) the route probe
    dumps to <run_dir>/lab/ for the offline predictor lab (benchmarks/predictor_lab.py); 0 = no
    dump (the probe's drift metrics are measured either way)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RLConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "prompts_per_step", "group_size", "num_ministeps"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        batch = self.prompts_per_step * self.group_size
        if batch % self.num_ministeps:
            raise ValueError(
                f"RLConfig.num_ministeps={self.num_ministeps} must divide the rollout batch "
                f"prompts_per_step * group_size = {batch}"
            )
        mini = batch // self.num_ministeps
        if self.micro_batch_size < 0 or (self.micro_batch_size and mini % self.micro_batch_size):
            raise ValueError(
                f"RLConfig.micro_batch_size={self.micro_batch_size} must be 0 or divide the "
                f"mini-batch size {mini}"
            )
        if self.engine_dtype not in ("bf16", "fp32"):
            raise ValueError(
                f"RLConfig.engine_dtype must be 'bf16' or 'fp32', got {self.engine_dtype!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"RLConfig.temperature must be > 0, got {self.temperature}")
        if not self.router_lr_mult > 0:
            raise ValueError(f"RLConfig.router_lr_mult must be > 0, got {self.router_lr_mult}")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"RLConfig.lr_warmup_iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_decay_style not in ("constant", "cosine"):
            raise ValueError(
                "RLConfig.lr_decay_style must be 'constant' or 'cosine', "
                f"got {self.lr_decay_style!r}"
            )
        if not 0.0 <= self.lr * self.router_lr_mult * self.router_anchor <= 1.0:
            # A pull above the whole deviation would overshoot the warm start at every step.
            raise ValueError(
                f"RLConfig.router_anchor={self.router_anchor} must be >= 0 with lr x "
                f"router_lr_mult x router_anchor <= 1 (lr={self.lr}, "
                f"router_lr_mult={self.router_lr_mult})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"RLConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.lab_dump_fraction <= 1.0:
            raise ValueError(
                f"RLConfig.lab_dump_fraction must be in [0, 1], got {self.lab_dump_fraction}"
            )


def lr_factor(cfg: RLConfig, iteration: int) -> float:
    """Policy learning-rate multiplier at 0-based optimizer step `iteration` of the run."""
    total = cfg.steps * cfg.num_ministeps
    if iteration < cfg.lr_warmup_iters:
        return (iteration + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return 1.0
    progress = (iteration - cfg.lr_warmup_iters) / max(1, total - cfg.lr_warmup_iters - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def derive_seed(*parts) -> int:
    """Stable 63-bit seed from any parts (seed, step, rank, purpose): independent streams whose
    values depend only on these parts, so a resumed run draws exactly what it would have."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def route_agreement(a: RouteBatch, b: RouteBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per layer of two routes of the same tokens: mean |a ∩ b| / k and the flip rate (fraction
    of tokens whose top-k sets differ), each [L] float64."""
    shared = topk_overlap(a.indices, b.indices)  # [T, L]
    return shared.double().mean(dim=0) / a.topk, (shared < a.topk).double().mean(dim=0)


def _dp_group():
    return parallel_state.get_data_parallel_group()


def _dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


class RLTrainer:
    """Trainer policy (fp32) + inference engine copy + optimizer for one RL run."""

    def __init__(
        self,
        cfg: RLConfig,
        model_cfg: ModelConfig,
        task: ArithmeticTask,
        tokenizer: TaskTokenizer,
        run_dir: str,
        init_state: Optional[dict] = None,  # a model.full_state_dict() (e.g. the SFT warm start)
        log: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.cfg, self.model_cfg, self.task, self.tokenizer = cfg, model_cfg, task, tokenizer
        self.run_dir = run_dir
        self.log = log or (lambda msg: None)
        self.device = default_device()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.prompt_length = 1 + task.config.prompt_chars  # BOS + one piece per character
        self.max_new_tokens = task.config.max_answer_chars + 1  # answer + EOS
        self.seq_length = self.prompt_length + self.max_new_tokens
        if self.seq_length > model_cfg.max_sequence_length:
            raise ValueError(
                f"ModelConfig.max_sequence_length={model_cfg.max_sequence_length} < "
                f"sequence length {self.seq_length} of the task"
            )
        vocab = tokenizer.padded_vocab_size()
        self.model = build_gpt_model(model_cfg, vocab, cfg.pr2, torch.float32, seed=cfg.seed)
        engine_dtype = torch.bfloat16 if cfg.engine_dtype == "bf16" else torch.float32
        self.engine = build_gpt_model(model_cfg, vocab, cfg.pr2, engine_dtype, seed=cfg.seed)
        if init_state is not None:
            load_full_state_dict(self.model, init_state)
        self.model.train()
        self.engine.eval()
        # GRPO's KL anchor: a frozen copy of the starting policy (the warm start), fp32.
        self.reference = None
        if cfg.policy.kl_coeff > 0:
            self.reference = build_gpt_model(
                model_cfg, vocab, cfg.pr2, torch.float32, seed=cfg.seed
            )
            self.reference.load_state_dict(self.model.state_dict())
            self.reference.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(),
            lr=cfg.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self._predictor_params = [p for p in self.model.parameters() if is_predictor_param(p)]
        # (group, base lr) of the scheduled groups: every group but the predictor's.
        self._scheduled = [
            (group, group["lr"])
            for group in self.optimizer.param_groups
            if not any(is_predictor_param(p) for p in group["params"])
        ]
        self._policy_params = [p for p in self.model.parameters() if not is_predictor_param(p)]
        self.step_index = 0
        # The routers' warm start (the weights this trainer starts from, also on resume).
        self._router_anchors = [
            r.weight.detach().clone() for r in pr2_routers(self.model) if cfg.router_anchor > 0
        ]
        # Router-weight change over the previous rollout batch (per router), for the drift
        # telemetry: how alike consecutive batches' drifts are is what a predictor can exploit.
        self._last_router_drift: Optional[List[torch.Tensor]] = None
        self.probe = RouteProbe(
            self.model, os.path.join(run_dir, "lab"), cfg.lab_dump_fraction, cfg.seed
        )

    def _param_groups(self) -> List[dict]:
        """predictor_param_groups, with the router weights in their own group at
        router_lr_mult x lr when that is not 1."""
        cfg = self.cfg
        groups = predictor_param_groups(
            self.model,
            cfg.lr,
            cfg.pr2.alpha,
            cfg.weight_decay,
            cfg.pr2.predictor_update,
            cfg.pr2.predictor_weight_decay,
        )
        if cfg.router_lr_mult == 1.0 and cfg.router_weight_decay is None:
            return groups
        routers = {id(r.weight) for r in pr2_routers(self.model)}
        rest = groups[0]
        router_params = [p for p in rest["params"] if id(p) in routers]
        rest["params"] = [p for p in rest["params"] if id(p) not in routers]
        router_group = dict(rest, params=router_params, lr=cfg.lr * cfg.router_lr_mult)
        if cfg.router_weight_decay is not None:
            router_group["weight_decay"] = cfg.router_weight_decay
        return [rest, router_group] + groups[1:]

    # -- one rollout batch -------------------------------------------------------------------
    def _microbatches(self, perm: torch.Tensor) -> List[List[torch.Tensor]]:
        """minibatches[i][j] = sequence indices of microbatch j of mini-step i + 1."""
        cfg = self.cfg
        mini = perm.numel() // cfg.num_ministeps
        micro = cfg.micro_batch_size or mini
        return [
            list(perm[i * mini : (i + 1) * mini].split(micro)) for i in range(cfg.num_ministeps)
        ]

    def step(self) -> Dict[str, float]:
        """Run one rollout batch and its N mini-steps; returns the step's global metrics."""
        cfg, tok = self.cfg, self.tokenizer
        step, dp_rank = self.step_index, _dp_rank()
        # routing() modes of (engine scoring pass, trainer old-policy pass, training mini-steps):
        # the measuring variant records wherever a strategy routes with the stock router, so
        # drift and training-inference mismatch are measured in every mode.
        engine_mode, old_mode, train_mode = strategy_modes(cfg.mode, measure=True)
        metrics = StepMetrics()
        clear_aux_losses_tracker()
        t_start = time.time()
        routers = pr2_routers(self.model)
        weights_before = [r.weight.detach().clone() for r in routers]
        self.probe.begin_step()

        # 1. Weight sync trainer -> engine (carries the PR2 predictor for pr2-r3). A lookahead
        # predictor observes the trainer's fp32 router weights first: the bf16 engine's own
        # weights would quantise the drift (its refresh is then a no-op: same weights).
        if cfg.mode == "pr2-r3":
            for router in routers:
                router.refresh_lookahead()
        copy_weights(self.model, self.engine)

        # 2. Rollout on the engine.
        problems = self.task.sample(
            random.Random(derive_seed(cfg.seed, step, dp_rank, "prompts")), cfg.prompts_per_step
        )
        problems = [p for p in problems for _ in range(cfg.group_size)]
        prompts = prompt_tokens(tok, problems).to(self.device)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, dp_rank, "sample"))
        with torch.no_grad():
            sequences = generate(
                self.engine,
                prompts,
                self.max_new_tokens,
                tok.vocab_size,
                cfg.temperature,
                gen,
                _dp_group(),
            )
        response_mask = response_mask_of(sequences, self.prompt_length)
        # [B, S]: input tokens whose routes the loss depends on (no padding, no post-EOS):
        # the predictor cache and the route probe take only these.
        token_mask = used_token_mask(response_mask, self.prompt_length)
        completions = [tok.decode(s[self.prompt_length :].tolist()) for s in sequences.cpu()]
        rewards = torch.tensor(self.task.rewards(problems, completions), dtype=torch.float32)
        advantages = grpo_advantages(rewards, cfg.group_size).to(self.device)
        metrics.add("rl/reward", float(rewards.sum()), rewards.numel())
        em = sum(exact_match(p.answer, c) for p, c in zip(problems, completions))
        metrics.add("rl/exact_match", em, len(problems))
        metrics.add("rl/response_length", float(response_mask.sum()), len(problems))
        t_rollout = time.time()

        perm = torch.randperm(
            sequences.size(0),
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, step, dp_rank, "perm")),
        ).to(self.device)
        minibatches = self._microbatches(perm)
        flat_micro = [mb for mini in minibatches for mb in mini]

        # 3. Engine scoring pass: rollout log-probs (+ routes for R3 modes).
        rollout_lp, engine_routes = [], []
        with torch.no_grad():
            for idx in flat_micro:
                with routing(
                    self.engine, engine_mode, **_cache_mask(engine_mode, token_mask[idx])
                ) as h:
                    lp, _ = score(self.engine, sequences[idx], tok.vocab_size)
                rollout_lp.append(lp)
                engine_routes.append(h.routes)

        # 4. Old-policy pass on the trainer (and the reference policy's log-probs).
        old_lp, old_routes, ref_lp = [], [], []
        with torch.no_grad():
            for j, idx in enumerate(flat_micro):
                if self.reference is not None:
                    ref_lp.append(score(self.reference, sequences[idx], tok.vocab_size)[0])
                routes = engine_routes[j] if old_mode == "replay" else None
                cache = _cache_mask(old_mode, token_mask[idx])
                with routing(self.model, old_mode, routes, **cache) as h, self.probe.old_pass(
                    j, token_mask[idx]
                ):
                    lp, ent = score(self.model, sequences[idx], tok.vocab_size, with_entropy=True)
                old_lp.append(lp)
                mask = response_mask[idx]
                n_tok = float(mask.sum())
                metrics.add("rl/entropy", float((ent * mask).sum()), n_tok)
                d = (lp - rollout_lp[j]) * mask
                # KL(pi_rollout || pi_old) on rollout samples, k3 estimator (non-negative).
                metrics.add(
                    "rl/train_inference_kl", float(((torch.exp(d) - 1 - d) * mask).sum()), n_tok
                )
                metrics.add("rl/train_inference_abs_logprob_diff", float(d.abs().sum()), n_tok)
                if old_mode == "replay":
                    old_routes.append(routes)
                    # Engine top-k vs the trainer's live top-k at theta_old, both without the
                    # predictor: the replayed route itself in r3; in pr2-r3 the top-k of the
                    # engine's cached p_old (every token is cached at the demo's lengths).
                    name = "r2_topk_accuracy" if cfg.mode == "pr2-r3" else "route_topk_accuracy"
                    metrics.add_per_layer("pr2/train_inference_route_accuracy", h.metrics[name])
                    metrics.add_layers("pr2/oldpass", h.metrics)
                else:
                    recorded = h.routes
                    old_routes.append(recorded)
                    plain = recorded
                    if old_mode == "predict_record":
                        # The predicted routes of upstream layers change the hidden states of
                        # later ones, so compare against an extra plain (stock top-k) forward.
                        with routing(self.model, "record") as hp:
                            score(self.model, sequences[idx], tok.vocab_size)
                        plain = hp.routes
                    acc, _ = route_agreement(engine_routes[j], plain)
                    metrics.add_per_layer("pr2/train_inference_route_accuracy", acc)
                if train_mode == "replay":
                    self.probe.set_replayed(j, old_routes[j])

        # 5. Mini-steps.
        mb_offset = 0
        for i, mini in enumerate(minibatches, start=1):
            self.optimizer.zero_grad(set_to_none=True)
            for idx in mini:
                j = mb_offset
                mb_offset += 1
                mask = response_mask[idx]
                if train_mode == "replay":
                    ctx = routing(self.model, "replay", old_routes[j], ministep=i)
                else:
                    ctx = routing(self.model, "record")
                with ctx as h, self.probe.ministep(i, j):
                    lp, _ = score(self.model, sequences[idx], tok.vocab_size)
                    loss, stats = policy_loss(
                        lp,
                        old_lp[j],
                        advantages[idx],
                        mask,
                        cfg.policy,
                        ref_lp[j] if ref_lp else None,
                    )
                    (loss / len(mini)).backward()
                if train_mode == "replay":
                    metrics.add_layers("pr2", h.metrics, ministep=i)
                else:
                    # No replay: measure the natural drift, |TopK(p_old) ∩ TopK(p_live)| / k.
                    acc, flips = route_agreement(old_routes[j], h.routes)
                    metrics.add_per_layer("pr2/route_topk_accuracy", acc, ministep=i)
                    metrics.add_per_layer("pr2/flip_rate", flips, ministep=i)
                self.probe.add_metrics(metrics, j)
                metrics.add("rl/policy_loss", float(loss.detach()), 1)
                if "kl_ref_sum" in stats:
                    metrics.add(
                        "rl/kl_to_reference", float(stats["kl_ref_sum"]), float(stats["tokens"])
                    )
                metrics.add("rl/clip_fraction", float(stats["clipped"]), float(stats["units"]))
                metrics.add(
                    f"rl/clip_fraction/ministep_{i}", float(stats["clipped"]), float(stats["units"])
                )
                metrics.add(
                    "rl/mean_abs_log_ratio",
                    float(stats["abs_log_ratio_sum"]),
                    float(stats["tokens"]),
                )
                metrics.add(
                    "rl/ratio_outside_0.5_2", float(stats["outside_0.5_2"]), float(stats["tokens"])
                )
                metrics.add_max("rl/max_ratio", float(stats["max_ratio"]))
            reduce_gradients(self.model)
            # The predictor is clipped on its own: its gradient must not throttle the policy's
            # (with one global clip, PR2 would train the policy more slowly than R2).
            grad_norm = clip_gradients(self.model, cfg.grad_clip, self._policy_params)
            metrics.add("rl/grad_norm", grad_norm, 1)
            if cfg.mode.startswith("pr2"):
                pred_norm = clip_gradients(self.model, cfg.grad_clip, self._predictor_params)
                metrics.add("pr2/predictor_grad_norm", pred_norm, 1)
            # No predictor loss this mini-step (mini-step 1, no cached tokens, or not a PR2
            # mode): its gradient is an exact zero, and AdamW momentum would still move it.
            factor = lr_factor(cfg, step * cfg.num_ministeps + i - 1)
            for group, base_lr in self._scheduled:
                group["lr"] = base_lr * factor
            metrics.add("rl/lr", cfg.lr * factor, 1)
            with predictor_step_frozen(self.optimizer, not self._predictor_has_gradient()):
                self.optimizer.step()
            if cfg.router_anchor > 0:
                pull = cfg.lr * factor * cfg.router_lr_mult * cfg.router_anchor
                with torch.no_grad():
                    for router, anchor in zip(routers, self._router_anchors):
                        router.weight.sub_(pull * (router.weight - anchor))
        self._router_drift_metrics(metrics, routers, weights_before)
        self.probe.end_step(step, self.rank, self._lab_meta())
        t_end = time.time()
        metrics.add("time/step_seconds", t_end - t_start, 1)
        metrics.add("time/rollout_seconds", t_rollout - t_start, 1)
        metrics.add("time/train_seconds", t_end - t_rollout, 1)
        self.step_index += 1
        return metrics.reduce(_dp_group())

    def _predictor_has_gradient(self) -> bool:
        """True when some predictor parameter got a nonzero gradient this mini-step (grads are
        already reduced over data-parallel ranks, so every rank agrees)."""
        return any(p.grad is not None and bool(p.grad.any()) for p in self._predictor_params)

    def _lab_meta(self) -> dict:
        """What the predictor lab needs to train a predictor as this run does."""
        cfg = self.cfg
        return {
            "mode": cfg.mode,
            "predictor": cfg.pr2.predictor,
            "loss": cfg.pr2.loss,
            "predictor_lr": cfg.lr * cfg.pr2.alpha,
            "predictor_update": cfg.pr2.predictor_update,
            "predictor_weight_decay": cfg.pr2.predictor_weight_decay,
            "lookahead_scale": cfg.pr2.lookahead_scale,
            "grad_clip": cfg.grad_clip,
            "loss_start": cfg.pr2.loss_start_ministep,
            "num_ministeps": cfg.num_ministeps,
        }

    def _router_drift_metrics(self, metrics: StepMetrics, routers, weights_before) -> None:
        """Per layer: relative norm of this batch's router-weight change and its cosine with the
        previous batch's change (1 = the drift repeats, 0 = unpredictable from the last one)."""
        drift = [r.weight.detach() - w for r, w in zip(routers, weights_before)]
        norms = torch.stack([d.norm() / w.norm() for d, w in zip(drift, weights_before)])
        metrics.add_per_layer("pr2/router_drift_relative_norm", norms)
        if self._last_router_drift is not None:
            cosine = torch.stack(
                [
                    torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
                    for a, b in zip(drift, self._last_router_drift)
                ]
            )
            metrics.add_per_layer("pr2/router_drift_cosine", cosine)
        self._last_router_drift = drift

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.run_dir, "checkpoints", f"step_{step:06d}")

    def save_checkpoint(self) -> str:
        """Policy (incl. predictor), optimizer, RNG states and step, one file per rank."""
        path = self.checkpoint_dir(self.step_index)
        os.makedirs(path, exist_ok=True)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        state = {
            "step": self.step_index,
            "config": _jsonable(dataclasses.asdict(self.cfg)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "router_drift": self._last_router_drift,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
                "megatron_tracker": tracker.get_states(),
            },
        }
        file = os.path.join(path, f"rank{self.rank:03d}.pt")
        torch.save(state, file + ".tmp")
        os.replace(file + ".tmp", file)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            latest = os.path.join(self.run_dir, "checkpoints", "latest.json")
            with open(latest + ".tmp", "w") as f:
                json.dump({"step": self.step_index, "path": path}, f)
            os.replace(latest + ".tmp", latest)
        return path

    def _read_checkpoint(self, path: str) -> dict:
        return torch.load(
            os.path.join(path, f"rank{self.rank:03d}.pt"), map_location="cpu", weights_only=False
        )

    def load_checkpoint(self, path: str, state: Optional[dict] = None) -> None:
        """Restore the run from checkpoint `path` (`state`: its file, already read)."""
        if state is None:
            state = self._read_checkpoint(path)
        saved = state["config"]
        now = _jsonable(dataclasses.asdict(self.cfg))
        diff = sorted(
            k for k in now if k not in ("steps", "checkpoint_interval") and saved.get(k) != now[k]
        )
        if diff:
            raise ValueError(f"checkpoint {path} was written with different RLConfig fields {diff}")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self._last_router_drift = state["router_drift"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["megatron_tracker"])
        self.step_index = int(state["step"])

    def latest_checkpoint(self) -> Optional[str]:
        latest = os.path.join(self.run_dir, "checkpoints", "latest.json")
        if not os.path.exists(latest):
            return None
        with open(latest) as f:
            return json.load(f)["path"]

    def resume(self) -> Optional[str]:
        """Load the newest checkpoint that every rank can read (see rl/checkpoint.py); return
        its path, or None when the run has none."""
        found = newest_readable(
            checkpoint_candidates(os.path.join(self.run_dir, "checkpoints")),
            self._read_checkpoint,
            self.device,
        )
        if found is None:
            return None
        path, state = found
        self.load_checkpoint(path, state)
        return path

    # -- driver ------------------------------------------------------------------------------
    def train(
        self,
        resume: bool = True,
        progress: bool = True,
        stop_after: Optional[int] = None,
        profile: Optional[ProfileConfig] = None,
    ):
        """Run until cfg.steps (resuming from the latest checkpoint when resume=True).

        stop_after: stop (without the final checkpoint) once this many steps are done, to
        emulate a killed run in tests. profile: capture a step range (see step_profiler.py);
        CPU traces go to <run_dir>/profile/. Returns the per-step metric dicts run here.
        """
        if resume:
            if self.resume() is not None:
                self.log(
                    f"[{self.cfg.mode} seed {self.cfg.seed}] resumed at step {self.step_index}"
                )
        writer = MetricsWriter(
            os.path.join(self.run_dir, "tb"), enabled=self.rank == 0, resume_step=self.step_index
        )
        profiler = None
        if profile is not None:
            trace_dir = os.path.join(self.run_dir, "profile")
            profiler = StepProfiler(profile, self.rank, trace_dir, self.log)
        history = []
        try:
            while self.step_index < self.cfg.steps:
                step = self.step_index
                if profiler is not None:
                    profiler.before_step(step + 1)
                m = self.step()
                if profiler is not None:
                    profiler.after_step(step + 1)
                writer.write(step, m)
                history.append({"step": step, **m})
                if progress:
                    self.log(_progress_line(self.cfg, step, m))
                ci = self.cfg.checkpoint_interval if self.cfg.save_checkpoints else 0
                if ci and self.step_index % ci == 0 and self.step_index < self.cfg.steps:
                    self.save_checkpoint()
                if stop_after is not None and self.step_index >= stop_after:
                    return history
            if self.cfg.save_checkpoints:
                self.save_checkpoint()
        finally:
            if profiler is not None:
                profiler.close()
            writer.close()
        return history

    @torch.no_grad()
    def evaluate(self, num_problems: int, seed: int = 10**6) -> Dict[str, float]:
        """Greedy exact match and reward of the trainer policy on fixed held-out problems
        (split over data-parallel ranks)."""
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), _dp_rank()
        problems = self.task.sample(random.Random(seed), num_problems)[dp_rank::dp]
        prompts = prompt_tokens(self.tokenizer, problems).to(self.device)
        seqs = generate(
            self.model,
            prompts,
            self.max_new_tokens,
            self.tokenizer.vocab_size,
            0.0,
            torch.Generator(),
            _dp_group(),
        )
        comps = [self.tokenizer.decode(s[self.prompt_length :].tolist()) for s in seqs.cpu()]
        m = StepMetrics()
        m.add(
            "eval/exact_match",
            sum(exact_match(p.answer, c) for p, c in zip(problems, comps)),
            len(problems),
        )
        m.add("eval/reward", sum(self.task.rewards(problems, comps)), len(problems))
        return m.reduce(_dp_group())


def _cache_mask(mode: str, token_mask: torch.Tensor) -> dict:
    """routing() keyword that keeps padding / post-EOS tokens out of the predictor cache."""
    return {"cache_mask": token_mask} if mode == "predict_record" else {}


def _progress_line(cfg: RLConfig, step: int, m: Dict[str, float]) -> str:
    acc = m.get("pr2/route_topk_accuracy/mean", float("nan"))
    label = f"{cfg.mode}-{cfg.pr2.predictor}" if cfg.mode.startswith("pr2") else cfg.mode
    return (
        f"[{label:>6} seed {cfg.seed}] step {step + 1:3d}/{cfg.steps} "
        f"reward {m['rl/reward']:.3f} em {m['rl/exact_match']:.3f} "
        f"clip {m['rl/clip_fraction']:.4f} |log r| {m['rl/mean_abs_log_ratio']:.4f} "
        f"route-acc {acc:.4f} kl {m['rl/train_inference_kl']:.2e} "
        f"{m['time/step_seconds']:.1f}s"
    )


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
