# Hook points of PR2 for RL frameworks built on Megatron-LM (megatron.training) or Megatron-Core.
#
#   schedule.py   routing_for_phase, forward_backward_with_routes, pr2_step, split_routes,
#                 wrap_forward_backward_func: routes bound to Megatron schedule calls per RL
#                 phase and strategy (megatron_pr2.phases)
#   metrics.py    save_pr2_metrics / report_pr2_metrics: per-layer PR2 health metrics through
#                 Megatron's MoE metrics tracker, reduced over ranks
#   provider.py   pr2_model_provider, pr2_router_scope: models whose MoE layers get PR2 routers
#   hooks.py      install_megatron_lm_hooks: runtime patch of megatron.training.training that
#                 wires the above into pretrain()/train() (patches/README.md)

from megatron_pr2.megatron_lm.hooks import (
    import_megatron_training,
    install_megatron_lm_hooks,
    log_pr2_metrics,
    pr2_optimizer_overrides_from_args,
    remove_megatron_lm_hooks,
)
from megatron_pr2.megatron_lm.metrics import (
    pr2_track_names,
    report_pr2_metrics,
    save_pr2_metrics,
    tracker_name,
)
from megatron_pr2.megatron_lm.provider import pr2_model_provider, pr2_router_scope
from megatron_pr2.megatron_lm.schedule import (
    PR2ForwardBackward,
    PR2Step,
    forward_backward_with_routes,
    last_train_handle,
    pr2_step,
    routing_for_phase,
    split_routes,
    wrap_forward_backward_func,
)
from megatron_pr2.parallel.layers import moe_layer_numbers
from megatron_pr2.phases import PHASE_MODES, PHASES, phase_routing_mode
from megatron_pr2.telemetry import METRIC_NAMES

__all__ = [
    "METRIC_NAMES",
    "PHASES",
    "PHASE_MODES",
    "PR2ForwardBackward",
    "PR2Step",
    "forward_backward_with_routes",
    "import_megatron_training",
    "install_megatron_lm_hooks",
    "last_train_handle",
    "log_pr2_metrics",
    "moe_layer_numbers",
    "phase_routing_mode",
    "pr2_model_provider",
    "pr2_optimizer_overrides_from_args",
    "pr2_router_scope",
    "pr2_step",
    "pr2_track_names",
    "remove_megatron_lm_hooks",
    "report_pr2_metrics",
    "routing_for_phase",
    "save_pr2_metrics",
    "split_routes",
    "tracker_name",
    "wrap_forward_backward_func",
]
