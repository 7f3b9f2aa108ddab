# Predictor lab: replay the router drift dumped by RL runs through PR2 predictor variants,
# offline, in seconds, instead of one whole RL run per variant.
#
# Input: dump directories written by the RL demo with --lab-dump-fraction f (RouteProbe, one
# file per RL step; see megatron_pr2/rl/route_probe.py): for a uniform sub-sample of the tokens
# that feed the policy loss,
#   h_old  [C, L, H]  router input of the old-policy pass     p_old  [C, L, E]  its router logits
#   p_live [C, L, E]  live router logits of the same token at its mini-step (ministep [C])
#   router_weight {0: [L, E, H] at the old pass, i: [L, E, H] live at mini-step i}
#   predictor_old  the run's predictor state at the old pass (the one its routes used)
#
# Protocol (the RL loop's, step for step): at step t a variant predicts with the state it had at
# the old pass, TopK(p_old + offset(h_old)), scored against TopK(p_live) at each mini-step i
# next to R2's TopK(p_old) on the same tokens; then a learned variant takes one optimizer step
# per mini-step i >= 2 on that mini-step's tokens (its own AdamW or SGD, gradient clipped at the
# run's grad_clip), so step t + 1 uses what step t taught (PR2's one-batch lag). Per variant:
# top-k accuracy per mini-step, the paired gain over R2 on the same tokens, and the
# explained-drift ratio 1 - KL(live || pred) / KL(live || old).
#
# Variant names: kind[@value[:value2]]
#   r2                   zero offset (what R2 replays)
#   lookahead@s          W_p = s x the router weight's change over the previous step
#   linear@lr            the paper's head (kl-post), AdamW at absolute lr (also lowrank, bias)
#   linear-sgd@lr        the same head trained by plain SGD (linear-sgdm: momentum 0.9)
#   linear-sgdupdate@lr  PR2Config.predictor_update="sgd" (AdamW, beta1 0, eps 1): ~ linear-sgd
#   linear-decay@lr:wd   the same with PR2Config.predictor_weight_decay wd: every update first
#                        shrinks W_p by lr x wd of itself (1 - lr x wd of the past is kept)
#   linear-eps@lr:eps    AdamW with epsilon eps: far above |gradient| it is momentum SGD at
#                        lr / eps (the regime of the paper's 30B runs, whose predictor
#                        gradients are tiny)
#   delta-kl@lr, l2@lr   the linear head with another objective
#   lookahead+linear@lr  a linear residual learned on top of lookahead@0.5 (-sgd: by SGD)
#   linear-pull@lr:c     AdamW linear head plus c x ||W_p - W_lookahead||^2
#   hindsight:<variant>  trained on a random half of each step's tokens, then evaluated on the
#                        other half of the same step: no one-batch lag, no in-sample fit (a bound
#                        on what removing the lag would give)
#   oracle-weight        the exact future router weight, old hidden states: (W_i - W_0) h_old
#                        (drift left unexplained is hidden-state drift; a diagnostic)
#   oracle-linear        a linear head fitted to the step's own drift (in-sample, no lag: the
#                        ceiling of any linear head; a diagnostic)
#   run                  the run's own predictor and predictor lr (reproduction check)
#
# python -m benchmarks.predictor_lab RUN_DIR [RUN_DIR ...] [--variants ...] [--markdown PATH]

import argparse
import glob
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_pr2.config import PR2Config
from megatron_pr2.optim import predictor_update_hyperparameters
from megatron_pr2.predictor import build_predictor, predictor_loss

DEFAULT_VARIANTS = (
    "r2",
    "lookahead@0.5",
    "lookahead@1.0",
    "linear@1e-6",
    "linear@3e-6",
    "linear@1e-5",
    "linear@3e-5",
    "linear@1e-4",
    "linear@1e-3",
    "linear@2e-2",
    "hindsight:linear@1e-5",
    "linear-sgd@0.1",
    "linear-sgd@1",
    "linear-sgdupdate@0.3",
    "linear-decay@0.3:1",
    "linear-decay@0.3:3",
    "linear-decay@0.3:3.33",
    "linear-decay@0.1:9",
    "lowrank@1e-5",
    "bias@1e-5",
    "delta-kl@1e-5",
    "lookahead+linear@3e-6",
    "linear-pull@1e-5:100",
    "oracle-weight",
    "oracle-linear",
    "run",
)


def load_dump(run_dir: str) -> List[dict]:
    """Per-step records of one run (rank 0's files under <run_dir>/lab or run_dir), by step;
    each gets `previous_router_weight` (the old-pass router weight of the step before)."""
    folder = (
        os.path.join(run_dir, "lab") if os.path.isdir(os.path.join(run_dir, "lab")) else run_dir
    )
    files = sorted(glob.glob(os.path.join(folder, "step*-rank000.pt")))
    if not files:
        raise ValueError(
            f"no lab dump (step*-rank000.pt) in {folder}: run with --lab-dump-fraction"
        )
    records = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    for prev, rec in zip([None] + records[:-1], records):
        contiguous = prev is not None and prev["step"] + 1 == rec["step"]
        rec["previous_router_weight"] = prev["router_weight"][0] if contiguous else None
    return records


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] |a ∩ b| / k of two [..., k] index sets, float64."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double() / a.shape[-1]


def kl_sum(target: torch.Tensor, logits: torch.Tensor) -> float:
    """Sum over rows of KL(softmax(target) || softmax(logits)) (last dim = experts)."""
    log_t = torch.log_softmax(target.double(), -1)
    return float((log_t.exp() * (log_t - torch.log_softmax(logits.double(), -1))).sum())


@dataclass
class Variant:
    """A predictor under test. offset(h, record, i): [C, L, E] with the state of the step's old
    pass; begin(record): sees the step before its old pass; train(h, p_old, p_live): one
    mini-step update (None: nothing to learn); idle(): a mini-step without predictor loss (the
    RL loop's optimizer still steps, frozen: AdamW moments decay and its step count grows);
    hindsight: evaluate after training."""

    name: str
    offset: Callable[[torch.Tensor, dict, int], torch.Tensor]
    begin: Callable[[dict], None] = lambda record: None
    train: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = None
    idle: Callable[[], None] = lambda: None
    weight: Callable[[], Optional[torch.Tensor]] = lambda: None
    hindsight: bool = False


def _zero(h: torch.Tensor, experts: int) -> torch.Tensor:
    return h.new_zeros(h.shape[0], h.shape[1], experts)


def lookahead(name: str, scale: float, experts: int) -> Variant:
    """LookaheadPredictor offline: scale x (W_0 of this step - W_0 of the previous step)."""
    state: Dict[str, torch.Tensor] = {}

    def begin(record: dict) -> None:
        if record["previous_router_weight"] is not None:
            state["w"] = scale * (record["router_weight"][0] - record["previous_router_weight"])

    def offset(h, record, i):
        return torch.einsum("clh,leh->cle", h, state["w"]) if "w" in state else _zero(h, experts)

    return Variant(name, offset, begin=begin, weight=lambda: state.get("w"))


def learned(
    name: str,
    kind: str,
    lr: float,
    shape: Sequence[int],
    loss: str = "kl-post",
    grad_clip: float = 1.0,
    optimizer: str = "adamw",
    base: Optional[Variant] = None,
    pull: float = 0.0,
    eps: float = 1e-8,
    update: str = "adam",
    weight_decay: float = 0.0,
) -> Variant:
    """The library's predictor module per layer, trained like the RL loop trains it. `base`: a
    fixed offset under the learned one; `pull`: weight of ||W_p - W_lookahead@0.5||^2;
    `weight_decay`: PR2Config.predictor_weight_decay (AdamW's decoupled decay)."""
    layers, hidden, experts = shape
    config = PR2Config(predictor=kind, loss=loss)
    heads = torch.nn.ModuleList([build_predictor(config, hidden, experts) for _ in range(layers)])
    params = list(heads.parameters())
    if optimizer == "adamw":
        # The RL loop's group: AdamW, or with predictor_update "sgd" beta1 0 and eps 1.
        hyper = {"betas": (0.9, 0.999), "eps": eps, **predictor_update_hyperparameters(update)}
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **hyper)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9 if optimizer == "sgdm" else 0.0)
    anchor = lookahead(name + "/anchor", 0.5, experts)
    record_seen: Dict[str, dict] = {}

    def raw(h: torch.Tensor) -> torch.Tensor:
        out = torch.stack([heads[n](h[:, n]) for n in range(layers)], dim=1)
        if base is not None:
            out = out + base.offset(h, record_seen["r"], 0)
        return out

    def begin(record: dict) -> None:
        record_seen["r"] = record
        anchor.begin(record)
        if base is not None:
            base.begin(record)

    def offset(h, record, i):
        with torch.no_grad():
            return raw(h)

    def train(h, p_old, p_live) -> None:
        opt.zero_grad(set_to_none=True)
        out = raw(h)
        total = sum(
            predictor_loss(loss, p_live[:, n], p_old[:, n], out[:, n]) for n in range(layers)
        )
        target = anchor.weight()
        if pull > 0 and target is not None:
            total = total + pull * sum(
                (heads[n].weight - target[n]).pow(2).sum() for n in range(layers)
            )
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    def idle() -> None:
        # optim.predictor_step_frozen: zero gradient, lr 0 for this step.
        for param in params:
            param.grad = torch.zeros_like(param)
        lrs = [group["lr"] for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr

    def weight() -> Optional[torch.Tensor]:
        if kind != "linear":
            return None
        return torch.stack([head.weight.detach() for head in heads])

    return Variant(name, offset, begin=begin, train=train, idle=idle, weight=weight)


def oracle_weight(name: str) -> Variant:
    def offset(h, record, i):
        w = record["router_weight"]
        return torch.einsum("clh,leh->cle", h, w[i] - w[0]) if i in w else _zero(h, w[0].shape[1])

    return Variant(name, offset)


def oracle_linear(
    name: str, shape: Sequence[int], iters: int = 150, lr: float = 1e-3, lag: int = 0
) -> Variant:
    """Fit h_old W to a step's own mini-step >= 2 drift (kl-post, Adam from zero); lag 0 uses
    it on the same step (in-sample ceiling), lag 1 on the next step (a full fit per batch)."""
    layers, hidden, experts = shape
    state: Dict[str, torch.Tensor] = {}

    def begin(record: dict) -> None:
        if lag:
            if "next" in state:
                state["w"] = state["next"]
            state["next"] = fit(record)
        else:
            state["w"] = fit(record)

    def offset(h, record, i):
        if "w" not in state:
            return _zero(h, experts)
        return torch.einsum("clh,leh->cle", h, state["w"])

    def fit(record: dict) -> torch.Tensor:
        keep = record["ministep"] >= 2
        h, p_old, p_live = record["h_old"][keep], record["p_old"][keep], record["p_live"][keep]
        w = torch.zeros(layers, experts, hidden, requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(iters):
            opt.zero_grad()
            out = torch.einsum("clh,leh->cle", h, w)
            loss = sum(
                predictor_loss("kl-post", p_live[:, n], p_old[:, n], out[:, n])
                for n in range(layers)
            )
            loss.backward()
            opt.step()
        return w.detach()

    return Variant(name, offset, begin=begin, weight=lambda: state.get("w"))


def build_variant(name: str, meta: dict, shape: Sequence[int]) -> Variant:
    """One variant by name (see the file header)."""
    if name.startswith("hindsight:"):
        variant = build_variant(name.split(":", 1)[1], meta, shape)
        variant.name, variant.hindsight = name, True
        return variant
    kind, _, args = name.partition("@")
    values = [float(v) for v in args.split(":")] if args else []
    clip = float(meta.get("grad_clip", 1.0))
    experts = shape[2]
    if kind == "run":
        if meta.get("predictor") == "lookahead":
            return lookahead(name, float(meta.get("lookahead_scale", 0.5)), experts)
        return learned(
            name,
            meta["predictor"],
            meta["predictor_lr"],
            shape,
            meta["loss"],
            clip,
            update=meta.get("predictor_update", "adam"),
            weight_decay=float(meta.get("predictor_weight_decay", 0.0)),
        )
    if kind == "r2":
        return Variant(name, lambda h, record, i: _zero(h, experts))
    if kind == "lookahead":
        return lookahead(name, values[0] if values else 0.5, experts)
    if kind == "oracle-weight":
        return oracle_weight(name)
    if kind == "oracle-linear":
        return oracle_linear(name, shape)
    if kind == "fit-last":
        return oracle_linear(name, shape, lag=1)
    if not values:
        raise ValueError(f"variant {name!r} needs a learning rate: {kind}@<lr>")
    if kind in ("linear", "lowrank", "bias"):
        return learned(name, kind, values[0], shape, grad_clip=clip)
    if kind == "linear-sgd":
        return learned(name, "linear", values[0], shape, grad_clip=clip, optimizer="sgd")
    if kind in ("linear-sgdupdate", "linear-decay"):
        # What PR2Config.predictor_update="sgd" runs (AdamW with beta1 0 and eps 1), with
        # PR2Config.predictor_weight_decay = values[1] (linear-decay; 0 if not given).
        decay = values[1] if len(values) > 1 else 0.0
        return learned(
            name, "linear", values[0], shape, grad_clip=clip, update="sgd", weight_decay=decay
        )
    if kind == "linear-sgdm":
        return learned(name, "linear", values[0], shape, grad_clip=clip, optimizer="sgdm")
    if kind == "linear-eps":
        return learned(name, "linear", values[0], shape, grad_clip=clip, eps=values[1])
    if kind in ("delta-kl", "l2"):
        return learned(name, "linear", values[0], shape, loss=kind, grad_clip=clip)
    if kind in ("lookahead+linear", "lookahead+linear-sgd"):
        base = lookahead(name + "/base", 0.5, experts)
        optimizer = "sgd" if kind.endswith("-sgd") else "adamw"
        return learned(
            name, "linear", values[0], shape, grad_clip=clip, base=base, optimizer=optimizer
        )
    if kind == "linear-pull":
        pull = values[1] if len(values) > 1 else 100.0
        return learned(name, "linear", values[0], shape, grad_clip=clip, pull=pull)
    raise ValueError(f"unknown predictor-lab variant {name!r} (see benchmarks/predictor_lab.py)")


def simulate(
    records: List[dict], variant: Variant, loss_start: int = 2, train_fraction: float = 1.0
) -> List[dict]:
    """Run one variant through a run's steps; per step and mini-step i: predicted and R2 top-k
    accuracy on the same tokens, KL(live || pred) and KL(live || old) sums, token count.
    train_fraction < 1 trains on a fixed random subset of each mini-step's tokens (how much
    does the predictor need?); accuracies are measured on all of them."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for record in records:
        variant.begin(record)
        h, p_old, p_live = record["h_old"], record["p_old"], record["p_live"]
        k = int(record["topk"])
        steps = sorted(int(i) for i in record["ministep"].unique())
        masks = {i: record["ministep"] == i for i in steps}
        # hindsight: disjoint halves of the step's tokens for training and for evaluation.
        half = torch.rand(h.shape[0], generator=generator) < 0.5
        train_masks = {i: m & half for i, m in masks.items()} if variant.hindsight else masks
        if variant.hindsight:
            masks = {i: m & ~half for i, m in masks.items()}

        def train() -> None:
            if variant.train is None:
                return
            for i in steps:
                m = train_masks[i]
                if train_fraction < 1.0:
                    m = m & (torch.rand(m.shape, generator=generator) < train_fraction)
                if i >= loss_start and bool(m.any()):
                    variant.train(h[m], p_old[m], p_live[m])
                else:
                    variant.idle()

        if variant.hindsight:
            train()
        row = {"step": record["step"]}
        for i in steps:
            m = masks[i]
            if not bool(m.any()):
                continue
            pred = p_old[m] + variant.offset(h[m], record, i)
            live_top = p_live[m].topk(k, dim=-1).indices
            row[f"pred/{i}"] = float(overlap(pred.topk(k, dim=-1).indices, live_top).mean())
            row[f"r2/{i}"] = float(overlap(p_old[m].topk(k, dim=-1).indices, live_top).mean())
            row[f"kl_pred/{i}"] = kl_sum(p_live[m], pred)
            row[f"kl_old/{i}"] = kl_sum(p_live[m], p_old[m])
            row[f"ratio/{i}"] = float(
                (pred - p_old[m]).abs().mean() / p_old[m].abs().mean().clamp(min=1e-12)
            )
        if not variant.hindsight:
            train()
        rows.append(row)
    return rows


def summarize(rows: List[dict], window: float = 0.5, min_ministep: int = 2) -> dict:
    """Means over the last `window` of the steps: per mini-step accuracy, mini-steps >= 2
    accuracy / R2 accuracy / paired gain (with its std over steps), explained drift, bias/logit."""
    rows = rows[int(len(rows) * (1 - window)) :]
    ministeps = sorted({int(k.split("/")[1]) for r in rows for k in r if k.startswith("pred/")})
    later = [i for i in ministeps if i >= min_ministep]
    out = {"steps": len(rows)}
    for i in ministeps:
        out[f"pred/{i}"] = statistics.fmean(r[f"pred/{i}"] for r in rows)
        out[f"r2/{i}"] = statistics.fmean(r[f"r2/{i}"] for r in rows)
    gains = [statistics.fmean(r[f"pred/{i}"] - r[f"r2/{i}"] for i in later) for r in rows]
    out["pred_ge2"] = statistics.fmean(
        statistics.fmean(r[f"pred/{i}"] for i in later) for r in rows
    )
    out["r2_ge2"] = statistics.fmean(statistics.fmean(r[f"r2/{i}"] for i in later) for r in rows)
    out["gain_ge2"] = statistics.fmean(gains)
    out["gain_ge2_step_std"] = statistics.stdev(gains) if len(gains) > 1 else 0.0
    kl_pred = sum(r[f"kl_pred/{i}"] for r in rows for i in later)
    kl_old = sum(r[f"kl_old/{i}"] for r in rows for i in later)
    out["explained_drift"] = 1 - kl_pred / kl_old if kl_old > 0 else float("nan")
    out["bias_to_logit"] = statistics.fmean(r[f"ratio/{i}"] for r in rows for i in later)
    return out


def drift_persistence(records: List[dict], lags: Sequence[int] = (1, 2, 3), window: float = 0.5):
    """How much of a batch's router-weight change D_t = W_0(t) - W_0(t - 1) earlier batches
    announce: per lag k the cosine of D_t with D_{t-k}, and "sum" its cosine with the sum of
    every earlier change (the deviation from the first dumped weight, which a predictor that
    never forgets accumulates), per layer, mean over layers and the last `window` of the steps.
    Positive: the drift persists (predictable from that history); negative: it reverts."""
    weights = [r["router_weight"][0].flatten(1) for r in records]
    changes = [b - a for a, b in zip(weights[:-1], weights[1:])]
    start = max(int(len(changes) * (1 - window)), max(lags))
    out = {}
    cosine = torch.nn.functional.cosine_similarity
    for k in lags:
        values = [
            float(cosine(changes[t], changes[t - k], dim=1).mean())
            for t in range(start, len(changes))
        ]
        out[f"lag {k}"] = statistics.fmean(values) if values else float("nan")
    values = [
        float(cosine(changes[t], weights[t] - weights[0], dim=1).mean())
        for t in range(start, len(changes))
    ]
    out["sum"] = statistics.fmean(values) if values else float("nan")
    return out


def run_lab(
    run_dirs: Sequence[str],
    variants: Sequence[str],
    window: float = 0.5,
    train_fraction: float = 1.0,
) -> Tuple[Dict[str, List[dict]], List[dict]]:
    """(results, persistence): results[variant] = one summary per run, persistence = one
    drift_persistence per run (in run_dirs order)."""
    results: Dict[str, List[dict]] = {name: [] for name in variants}
    persistence = []
    for run_dir in run_dirs:
        records = load_dump(run_dir)
        persistence.append(drift_persistence(records, window=window))
        meta = records[0]["meta"]
        shape = records[0]["h_old"].shape[1:] + records[0]["p_old"].shape[-1:]
        for name in variants:
            variant = build_variant(name, meta, shape)
            results[name].append(
                summarize(
                    simulate(records, variant, int(meta.get("loss_start", 2)), train_fraction),
                    window,
                )
            )
    return results, persistence


def real_run_accuracy(run_dir: str, window: float = 0.5) -> Optional[dict]:
    """The run's own measurement (metrics.jsonl of the RL loop): replayed and stale top-k
    accuracy at mini-steps >= 2 on all watched tokens, over the same window of steps."""
    path = os.path.join(run_dir, "tb", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    history = history[int(len(history) * (1 - window)) :]

    def mean(key: str) -> Optional[float]:
        values = [h[key] for h in history if key in h and h[key] == h[key]]
        return statistics.fmean(values) if values else None

    return {
        "replayed_ge2": mean("drift/replayed_topk_accuracy/ministep_ge2"),
        "stale_ge2": mean("drift/stale_topk_accuracy/ministep_ge2"),
    }


def _ms(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}"


def markdown(
    results: Dict[str, List[dict]],
    run_dirs: Sequence[str],
    seconds: float,
    window: float = 0.5,
    persistence: Optional[List[dict]] = None,
) -> str:
    """Table of every variant: mean ± std over runs (seeds); then the drift persistence."""
    first = next(iter(results.values()))[0]
    ministeps = sorted(int(k.split("/")[1]) for k in first if k.startswith("pred/"))
    head = ["variant"] + [f"acc i={i}" for i in ministeps]
    head += [
        "acc i>=2",
        "R2 i>=2",
        "gain vs R2",
        "gain > seed spread",
        "explained drift",
        "bias/logit",
    ]
    lines = [
        f"Predictor lab: {len(run_dirs)} run(s), {first['steps']} steps each (last half), "
        f"{seconds:.1f} s. Mean ± std over runs; gain = paired (same tokens) accuracy minus R2's.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, per_run in results.items():
        gains = [r["gain_ge2"] for r in per_run]
        spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        clear = "yes" if len(gains) > 1 and statistics.fmean(gains) > spread else "no"
        cells = [name] + [_ms([r[f"pred/{i}"] for r in per_run]) for i in ministeps]
        cells += [_ms([r["pred_ge2"] for r in per_run]), _ms([r["r2_ge2"] for r in per_run])]
        cells += [f"{statistics.fmean(gains):+.4f}", clear]
        cells += [
            _ms([r["explained_drift"] for r in per_run]),
            _ms([r["bias_to_logit"] for r in per_run]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    real = [real_run_accuracy(d, window) for d in run_dirs]
    if "run" in results and all(r and r["replayed_ge2"] is not None for r in real):
        lab = [r["pred_ge2"] for r in results["run"]]
        measured = [r["replayed_ge2"] for r in real]
        diffs = [a - b for a, b in zip(lab, measured)]
        lines += [
            "",
            "Reproduction of the real runs (their own predictor, mini-steps >= 2): lab "
            f"{_ms(lab)} vs measured in the runs {_ms(measured)}; per-run lab - run "
            + ", ".join(f"{d:+.4f}" for d in diffs),
        ]
    if persistence:
        cells = ", ".join(f"{k} {_ms([p[k] for p in persistence])}" for k in persistence[0])
        lines += [
            "",
            "Drift persistence (cosine of a batch's router-weight change with the change k "
            "batches earlier, and with the sum of all earlier changes; mean over layers): " + cells,
        ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predictor_lab", description=__doc__)
    p.add_argument("run_dirs", nargs="+", help="RL run dirs (or their lab/ dump dirs)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--window", type=float, default=0.5, help="fraction of last steps averaged")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train learned variants on this fraction of each mini-step's dumped tokens",
    )
    p.add_argument("--json", default=None, help="per-run summaries as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    results, persistence = run_lab(args.run_dirs, args.variants, args.window, args.train_fraction)
    text = markdown(results, args.run_dirs, time.time() - t0, args.window, persistence)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
