# The one strategy table: RL phase x replay strategy -> megatron_pr2.routing mode.
#
# Used by the Megatron-LM hooks (megatron_lm/schedule.py), the RL demo (rl/loop.py) and the
# argument parser (arguments.py, --pr2-mode).

from typing import Dict, Tuple

PHASES = ("rollout", "old_logprob", "train")
"""rollout: generation with the policy (the inference pass); old_logprob: the trainer's pass that
computes log pi_old over the rollout batch; train: the policy-gradient mini-steps."""

STRATEGIES = ("none", "r2", "r3", "pr2", "pr2-r3")
"""RL routing strategies: none (stock routing everywhere), r2 (record in the old-policy pass,
replay in training), r3 (record the rollout, replay in old-policy and training), pr2 (r2 with the
predictor), pr2-r3 (r3 with the predictor)."""

PHASE_MODES: Dict[str, Dict[str, str]] = {
    "none": {"rollout": "off", "old_logprob": "off", "train": "off"},
    # R2: the trainer's old-policy pass records, training replays it.
    "r2": {"rollout": "off", "old_logprob": "record", "train": "replay"},
    # R3: the rollout records; the old-policy pass and training replay the rollout's routes.
    "r3": {"rollout": "record", "old_logprob": "replay", "train": "replay"},
    # PR2 on R2: the old-policy pass routes with live logits + predictor offset and caches
    # (h_old, p_old) for the predictor loss; training replays and trains the predictor.
    "pr2": {"rollout": "off", "old_logprob": "predict_record", "train": "replay"},
    # PR2 on R3: the rollout pass is the predictive record.
    "pr2-r3": {"rollout": "predict_record", "old_logprob": "replay", "train": "replay"},
}
assert tuple(PHASE_MODES) == STRATEGIES


def phase_routing_mode(phase: str, mode: str, *, measure: bool = False) -> str:
    """megatron_pr2.routing mode ("off", "record", "predict_record", "replay") of an RL phase
    under strategy `mode` (--pr2-mode).

    measure: the measuring variant: phases that route with the stock router ("off") record
    instead. "record" routes exactly as "off" does, and its routes let a caller measure router
    drift and training-inference mismatch under every strategy (the RL demo does).

    With an external inference engine (vLLM, SGLang) the rollout does not run this model: under
    r3 / pr2-r3 import the engine's routes with megatron_pr2.engines instead of recording here.
    """
    if mode not in PHASE_MODES:
        raise ValueError(f"--pr2-mode={mode}: must be one of {STRATEGIES}")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: must be one of {PHASES}")
    routing_mode = PHASE_MODES[mode][phase]
    return "record" if measure and routing_mode == "off" else routing_mode


def strategy_modes(mode: str, *, measure: bool = False) -> Tuple[str, str, str]:
    """The routing modes of (rollout, old_logprob, train) under strategy `mode`."""
    return tuple(phase_routing_mode(phase, mode, measure=measure) for phase in PHASES)
