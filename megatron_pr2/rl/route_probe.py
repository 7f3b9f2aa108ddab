# Route probe of the RL loop: router drift measured on the tokens the policy loss uses, in every
# routing mode, and an optional dump of (h_old, p_old, p_live) for the offline predictor lab.
#
# Shapes: a microbatch of B sequences x S tokens; router rows are the flattened [S, B] layer
# input (row s * B + b holds canonical token b * S + s). The probe watches the C_j router rows
# of the tokens whose routes the policy loss depends on (rollout.used_token_mask: prompt and
# response up to the input that predicts EOS, never padding); per router it keeps top-k
# [C_j, k] and, when dumping, h [C_j, H] and logits [C_j, E].
#
# Why a separate probe: the library's replay telemetry exists only in replay modes and on
# predictor-cache rows; a comparison of modes needs one measurement that is the same in all of
# them (no replay included) and ignores padding and post-EOS tokens. It uses forward
# pre-hooks on the trainer's routers, recomputes the router logits of the watched rows without
# gradient (one [C_j, H] x [H, E] GEMM per router and pass), and never changes the forward.
#
# Metrics (StepMetrics, per MoE layer and per mini-step i; see StepMetrics.add_per_layer):
#   drift/stale_topk_accuracy     |TopK(p_old) ∩ TopK(p_live_i)| / k: what R2 would replay
#   drift/replayed_topk_accuracy  |replayed route ∩ TopK(p_live_i)| / k (modes that replay)
#   drift/expert_change_per_update  1 - stale accuracy at mini-step 2: the fraction of
#       (token, MoE layer, slot) whose live top-k changed after ONE optimizer step, same tokens.

import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch

from megatron_pr2.model_index import pr2_routers
from megatron_pr2.routes import RouteBatch
from megatron_pr2.telemetry import topk_overlap


def watched_rows(token_mask: torch.Tensor) -> torch.Tensor:
    """Router rows and canonical token ids of the masked tokens.

    token_mask [B, S] bool over input tokens (rollout.used_token_mask). Returns [2, C] int64:
    router rows (s * B + b, the flattened [S, B] order) and canonical ids (b * S + s), both in
    router-row order."""
    batch, seq = token_mask.shape
    s, b = torch.nonzero(token_mask.t(), as_tuple=True)  # row-major over [S, B]: router rows
    return torch.stack([s * batch + b, b * seq + s]).cpu()


class RouteProbe:
    """Forward pre-hooks on `model`'s PR2 routers; see the file header."""

    def __init__(
        self,
        model: torch.nn.Module,
        dump_dir: Optional[str] = None,
        dump_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= dump_fraction <= 1.0:
            raise ValueError(f"RouteProbe dump_fraction={dump_fraction!r}: must be in [0, 1]")
        self.routers = sorted(pr2_routers(model), key=lambda r: r.moe_layer_id)
        self.dump_dir = dump_dir if dump_fraction > 0 else None
        self.dump_fraction = dump_fraction
        self.seed = seed
        self._phase: Optional[str] = None  # "old" or "live"
        self._microbatch = 0
        self._ministep = 0
        self._rows: Dict[int, torch.Tensor] = {}  # microbatch -> [2, C_j]
        self._old_top: Dict[int, List[torch.Tensor]] = {}  # microbatch -> per layer [C_j, k]
        self._replayed: Dict[int, torch.Tensor] = {}  # microbatch -> [C_j, L, k]
        self._live: Dict[int, Dict[int, torch.Tensor]] = {}  # microbatch -> layer -> [C_j, k]
        self._dump: Dict[str, Dict[int, List[torch.Tensor]]] = {}
        self._ministep_of: Dict[int, int] = {}
        self._router_weights: Dict[int, torch.Tensor] = {}  # mini-step (0 = old) -> [L, E, H]
        self._predictor_old: List[Dict[str, torch.Tensor]] = []
        self._handles = [
            r.register_forward_pre_hook(self._make_hook(n)) for n, r in enumerate(self.routers)
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- phases driven by the RL loop ------------------------------------------------------------
    def begin_step(self) -> None:
        self._rows.clear()
        self._old_top.clear()
        self._replayed.clear()
        self._live.clear()
        self._dump = {"h_old": {}, "p_old": {}, "p_live": {}}
        self._ministep_of.clear()
        self._router_weights.clear()
        self._predictor_old = []

    @contextmanager
    def old_pass(self, microbatch: int, token_mask: torch.Tensor) -> Iterator[None]:
        """The trainer's old-policy forward of `microbatch` (token_mask [B, S]: watched tokens)."""
        self._rows[microbatch] = watched_rows(token_mask)
        self._old_top[microbatch] = [None] * len(self.routers)
        if 0 not in self._router_weights:
            self._router_weights[0] = self._weights()
            self._predictor_old = [
                {k: v.detach().cpu().clone() for k, v in r.predictor.state_dict().items()}
                for r in self.routers
            ]
        with self._in("old", microbatch):
            yield

    def set_replayed(self, microbatch: int, routes: RouteBatch) -> None:
        """The route the mini-steps replay for `microbatch` (canonical RouteBatch)."""
        canonical = self._rows[microbatch][1]
        columns = routes.columns_for(torch.tensor([r.moe_layer_id for r in self.routers]))
        self._replayed[microbatch] = routes.indices[routes.rows_for(canonical)][:, columns]

    @contextmanager
    def ministep(self, ministep: int, microbatch: int) -> Iterator[None]:
        """Training forward of `microbatch` at mini-step `ministep` (before its optimizer step)."""
        self._ministep_of[microbatch] = ministep
        if ministep not in self._router_weights:
            self._router_weights[ministep] = self._weights()
        self._live[microbatch] = {}
        self._ministep = ministep
        with self._in("live", microbatch):
            yield

    def add_metrics(self, metrics, microbatch: int) -> None:
        """Per-layer accuracies of `microbatch` at its mini-step into a StepMetrics."""
        i = self._ministep_of[microbatch]
        k = self.routers[0].topk
        stale, replayed = [], []
        for layer, live in sorted(self._live[microbatch].items()):
            stale.append(topk_overlap(self._old_top[microbatch][layer], live).double().mean() / k)
            if microbatch in self._replayed:
                target = self._replayed[microbatch][:, layer].to(live.device)
                replayed.append(topk_overlap(target, live).double().mean() / k)
        if not stale or not self._rows[microbatch].shape[1]:
            return
        metrics.add_per_layer("drift/stale_topk_accuracy", torch.stack(stale), ministep=i)
        if replayed:
            metrics.add_per_layer("drift/replayed_topk_accuracy", torch.stack(replayed), ministep=i)
        if i == 2:
            metrics.add_per_layer("drift/expert_change_per_update", 1 - torch.stack(stale))

    def end_step(self, step: int, rank: int = 0, meta: Optional[dict] = None) -> Optional[str]:
        """Write the step's dump (if dumping); returns its path."""
        if self.dump_dir is None or not self._dump["p_live"]:
            return None
        order = sorted(self._dump["p_live"])
        parts = {
            name: torch.cat([self._stack(self._dump[name][j]) for j in order])
            for name in ("h_old", "p_old", "p_live")
        }
        counts = [self._dump["p_live"][j][0].shape[0] for j in order]
        record = {
            "step": step,
            **parts,
            "ministep": torch.cat(
                [
                    torch.full((c,), self._ministep_of[j], dtype=torch.int8)
                    for c, j in zip(counts, order)
                ]
            ),
            "replayed": self._dump_replayed(order),
            "router_weight": self._router_weights,
            "predictor_old": self._predictor_old,
            "topk": self.routers[0].topk,
            "meta": meta or {},
        }
        os.makedirs(self.dump_dir, exist_ok=True)
        path = os.path.join(self.dump_dir, f"step{step:05d}-rank{rank:03d}.pt")
        torch.save(record, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    # -- internals -------------------------------------------------------------------------------
    @contextmanager
    def _in(self, phase: str, microbatch: int) -> Iterator[None]:
        self._phase, self._microbatch = phase, microbatch
        try:
            yield
        finally:
            self._phase = None

    def _weights(self) -> torch.Tensor:
        return torch.stack([r.weight.detach().float().cpu().clone() for r in self.routers])

    def _sampled(self, microbatch: int, count: int) -> torch.Tensor:
        """Fixed uniform sub-sample of a microbatch's watched rows for the dump."""
        keep = max(1, round(count * self.dump_fraction)) if count else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + microbatch)
        return torch.randperm(count, generator=generator)[:keep].sort().values

    def _make_hook(self, layer: int):
        def hook(router, args):
            if self._phase is None or torch._C._current_graph_task_id() != -1:
                return None  # not watched, or an activation recompute inside backward
            microbatch = self._microbatch
            rows = self._rows[microbatch][0].to(args[0].device)
            with torch.no_grad():
                hidden = args[0].reshape(-1, args[0].shape[-1])[rows].detach()
                logits = router.gating(hidden).float()
                top = router.live_topk(logits)
            if self._phase == "old":
                self._old_top[microbatch][layer] = top
            else:
                self._live[microbatch][layer] = top
            if self.dump_dir is not None:
                pick = self._sampled(microbatch, rows.numel()).to(top.device)
                names = ("h_old", "p_old") if self._phase == "old" else ("p_live",)
                values = (hidden, logits) if self._phase == "old" else (logits,)
                for name, value in zip(names, values):
                    slots = self._dump[name].setdefault(microbatch, [None] * len(self.routers))
                    slots[layer] = value[pick].float().cpu()
            return None

        return hook

    @staticmethod
    def _stack(per_layer: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack(per_layer, dim=1)  # [C, L, ...]

    def _dump_replayed(self, order: List[int]) -> Optional[torch.Tensor]:
        if not all(j in self._replayed for j in order):
            return None
        parts = []
        for j in order:
            pick = self._sampled(j, self._rows[j].shape[1])
            parts.append(self._replayed[j][pick].to(torch.int16))
        return torch.cat(parts)
