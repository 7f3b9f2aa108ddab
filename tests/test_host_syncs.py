# No device-to-host sync on the per-microbatch path of record, predict_record and replay.
#
# On a GPU every .item() / int() / float() / bool() / .tolist() / .cpu() / .numpy() of a device
# tensor blocks the host until the device catches up. This test patches those methods of
# torch.Tensor while a two-layer PR2 MoE stack runs the forward and backward passes of several
# microbatches inside a routing() context (after its entry, which may sync once), and counts
# the calls made directly from megatron_pr2 code. Megatron-Core's own calls (its dispatcher,
# its aux losses) are stock behaviour and not counted. Covered: record, predict_record (with the
# predictor cache), replay with the cache, the predictor loss, telemetry, the dispatch plan and
# MoE-layer activation recompute (the recompute re-uploads routes). On CPU the patched calls
# cost nothing, but the same code runs on CUDA, where each would be a sync.

import contextlib
import os
import sys

import pytest
import torch
from harness import build_moe_layer, make_moe_config
from single_rank import single_rank

NUM_MB, SEQ, BATCH = 3, 16, 2
_PACKAGE = os.path.dirname(os.path.abspath(__import__("megatron_pr2").__file__))
_METHODS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


@contextlib.contextmanager
def count_host_syncs():
    """Patch torch.Tensor's host-reading methods; yields {method: [caller file:line, ...]} of
    calls whose immediate caller is megatron_pr2 code."""
    calls = {name: [] for name in _METHODS}
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def wrap(name, original):
        def patched(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = os.path.abspath(caller.f_code.co_filename)
            if path.startswith(_PACKAGE):
                calls[name].append(f"{os.path.relpath(path, _PACKAGE)}:{caller.f_lineno}")
            return original(self, *args, **kwargs)

        return patched

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _stack(pg, recompute):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_pr2 import PR2Config, apply_pr2
    from megatron_pr2.compat import moe_submodules_of

    overrides = dict(recompute_granularity="selective", recompute_modules=["moe"])
    config = make_moe_config(
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        **(overrides if recompute else {}),
    )
    spec = apply_pr2(
        get_gpt_layer_local_spec(num_experts=config.num_moe_experts),
        PR2Config(cache_tokens_per_sequence=4, telemetry=True),
    )
    torch.manual_seed(0)
    layers = torch.nn.ModuleList()
    for number in (1, 2):
        layer = build_moe_layer(config, moe_submodules_of(spec.submodules.mlp), pg_collection=pg)
        layer.set_layer_number(number)
        layers.append(layer)
    return layers, config


def _forward(layers, x):
    for layer in layers:
        x, _ = layer(x)
    return x


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "moe_recompute"])
def test_no_host_sync_per_microbatch(pg, recompute):
    from megatron_pr2 import routing

    layers, config = _stack(pg, recompute)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(SEQ, BATCH, config.hidden_size, generator=gen) for _ in range(NUM_MB)]
    seen = {}
    for mode in ("record", "predict_record"):
        with torch.no_grad(), routing(layers, mode) as handle:
            with count_host_syncs() as calls:
                for x in xs:
                    _forward(layers, x)
        seen[mode] = calls
        routes = handle.routes_per_microbatch
    assert routes[0].cache is not None
    with routing(layers, "replay", routes, ministep=2, dispatch_plan=True) as handle:
        with count_host_syncs() as calls:
            outs = [_forward(layers, x.clone().requires_grad_(True)) for x in xs]
            for out in outs:  # all forwards, then all backwards (recompute after later forwards)
                out.sum().backward()
    seen["replay"] = calls
    # On the device only what is in flight: the microbatch a router uses and the next one
    # (prefetched); each uploaded once per pass (forward, and again for its recompute).
    stats = handle._session.residency.stats
    assert stats.peak_microbatches == 2 and stats.resident_bytes == 0
    assert stats.uploads == NUM_MB * (2 if recompute else 1)
    # The path ran: telemetry was measured and the predictor got its loss gradient.
    assert all(value == value for value in handle.metrics["predictor_loss"].tolist())
    assert layers[0].router.predictor.weight.grad is not None
    for mode, calls in seen.items():
        assert not any(calls.values()), (mode, {k: v for k, v in calls.items() if v})
    # The counter can fail: a sync-reading call from megatron_pr2 is caught.
    with count_host_syncs() as calls:
        exec(compile("torch.ones(1).item()", os.path.join(_PACKAGE, "probe.py"), "exec"))
    assert calls["item"] == ["probe.py:1"]
