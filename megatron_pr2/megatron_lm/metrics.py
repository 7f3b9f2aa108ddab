# PR2 health metrics through Megatron's MoE metrics tracker, reduced over all ranks and logged to
# TensorBoard / W&B like Megatron's own aux losses.
#
# Shapes: metric tensors in the tracker are [num_layers (+ MTP)], indexed by Megatron's 1-based
# transformer layer number, like its aux-loss entries.

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from megatron.core import parallel_state

from megatron_pr2 import compat
from megatron_pr2.parallel.layers import moe_layer_numbers
from megatron_pr2.routing_context import RoutingHandle
from megatron_pr2.telemetry import METRIC_NAMES


def tracker_name(metric: str) -> str:
    """Tracker entry of a PR2 metric: per-layer sum over ranks of the rank-local means."""
    return f"pr2/{metric}"


def _measured_name(metric: str) -> str:
    # Per layer, how many ranks measured the metric (its companion entry; see save_pr2_metrics).
    return f"pr2/{metric}/ranks"


def pr2_track_names() -> List[str]:
    """Every tracker entry save_pr2_metrics creates (the same list on every rank)."""
    return [n for m in METRIC_NAMES for n in (tracker_name(m), _measured_name(m))]


def _metrics_device() -> torch.device:
    # Tracker tensors take part in collectives: on the accelerator under NCCL.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_pr2_metrics(
    handle: Optional[RoutingHandle],
    *,
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
    pg_collection: Any = None,
) -> List[str]:
    """Save the replay metrics of `handle` into Megatron's MoE metrics tracker; call on EVERY rank.

    For each metric m two entries of size num_layers (+ mtp_num_layers) are written at the MoE
    layers' transformer layer numbers: "pr2/m" (this rank's mean) and "pr2/m/ranks" (1 where this
    rank measured m). Both reduce by sum over the pipeline group (Megatron's tracker does that for
    every entry) and over the tensor x data x context parallel group (reduce_group; sums only,
    which gloo also supports), so after the reduction "pr2/m" / "pr2/m/ranks" is the mean over
    the ranks that measured m. Ranks without a handle (a pipeline stage without MoE layers, a
    non-replay phase) create the same entries with zeros, so every rank joins every reduction.
    Returns the entry names (pr2_track_names()).
    """
    if pg_collection is not None:
        reduce_group = pg_collection.tp_dp_cp
    else:
        reduce_group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    size = num_layers + (mtp_num_layers or 0)
    device = _metrics_device()
    layer_numbers = moe_layer_numbers(num_layers, moe_layer_freq, mtp_num_layers)
    metrics: Dict[str, torch.Tensor] = {}
    layer_ids: List[int] = []
    if handle is not None and handle.mode == "replay":
        metrics, layer_ids = handle.metrics, handle.layer_ids

    def save(name: str, value: float, layer_number: int) -> None:
        compat.save_to_aux_losses_tracker(
            name,
            torch.tensor(value, dtype=torch.float32, device=device),
            layer_number,
            size,
            reduce_group=reduce_group,
            reduce_group_has_dp=True,
        )

    for metric in METRIC_NAMES:
        # A zero added at layer 1 creates the entry with the same size and groups on every rank.
        save(tracker_name(metric), 0.0, 1)
        save(_measured_name(metric), 0.0, 1)
        values = metrics.get(metric)
        if values is None:
            continue
        for moe_layer_id, value in zip(layer_ids, values.tolist()):
            if math.isnan(value):
                continue
            save(tracker_name(metric), value, layer_numbers[moe_layer_id])
            save(_measured_name(metric), 1.0, layer_numbers[moe_layer_id])
    return pr2_track_names()


def report_pr2_metrics(
    handle: Optional[RoutingHandle],
    iteration: int,
    writer: Any = None,
    wandb_writer: Any = None,
    *,
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
    per_layer_logging: bool = False,
    total_loss_dict: Optional[dict] = None,
    pg_collection: Any = None,
) -> Dict[str, float]:
    """Reduce the PR2 metrics of this step over all ranks and log them; call on EVERY rank.

    handle: the replay handle of this rank (routing()/routing_for_phase/pr2_step), or None on
    ranks without MoE layers or without a replay this step.
    Saves through save_pr2_metrics, reduces with Megatron's tracker reduction (the one
    track_moe_metrics runs), writes "pr2/<metric>" (mean over the MoE layers that measured it)
    and, with per_layer_logging, "moe/pr2/<metric>_layer_<i>" (i: 0-based transformer layer, as
    Megatron's per-layer MoE logging) to the TensorBoard `writer` / `wandb_writer` where given
    (Megatron-LM: the last rank); adds "pr2/predictor_loss" to total_loss_dict when given. The
    PR2 entries are then removed from the tracker, so Megatron's own report of its aux losses
    neither sees nor clears them, and other tracker entries are left untouched.
    Returns {tag: value} of every scalar logged or loggable (identical on all ranks).
    """
    names = save_pr2_metrics(
        handle,
        num_layers=num_layers,
        moe_layer_freq=moe_layer_freq,
        mtp_num_layers=mtp_num_layers,
        pg_collection=pg_collection,
    )
    try:
        compat.reduce_aux_losses_tracker_across_ranks(names, pg_collection=pg_collection)
        entries = compat.get_moe_layer_wise_logging_tracker()
        scalars: Dict[str, float] = {}
        per_layer: Dict[str, float] = {}
        for metric in METRIC_NAMES:
            sums = entries[tracker_name(metric)]["values"].detach().double().cpu()
            ranks = entries[_measured_name(metric)]["values"].detach().double().cpu()
            measured = torch.nonzero(ranks > 0).squeeze(1)
            if measured.numel() == 0:
                continue
            layer_means = sums[measured] / ranks[measured]
            tag = tracker_name(metric)
            scalars[tag] = float(layer_means.mean())
            for layer, value in zip(measured.tolist(), layer_means.tolist()):
                per_layer[f"moe/{tag}_layer_{layer}"] = value
    finally:
        compat.discard_moe_metrics(names)

    logged = dict(scalars)
    if per_layer_logging:
        logged.update(per_layer)
    for tag, value in logged.items():
        if writer is not None:
            writer.add_scalar(tag, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log({tag: value}, iteration)
    loss_tag = tracker_name("predictor_loss")
    if total_loss_dict is not None and loss_tag in scalars:
        value = torch.tensor([scalars[loss_tag]], dtype=torch.float32, device=_metrics_device())
        total_loss_dict[loss_tag] = total_loss_dict.get(loss_tag, 0.0) + value
    return {**scalars, **per_layer}


# ---------------------------------------------------------------------------------------------
