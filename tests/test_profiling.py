# PR2's profiling ranges: a CPU torch.profiler trace of one replay forward+backward of a tiny
# MoE layer with a PR2 router holds the pr2/replay and pr2/predictor ranges (the predictor runs
# inside replay for the predictor loss), the record pass holds pr2/record, and on CUDA the same
# ranges go to NVTX through Megatron's helpers (checked here with a recording stand-in).

import json

import pytest
import torch
from harness import build_pr2_moe_layer, make_moe_config
from single_rank import single_rank


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


def _pr2_layer(pg):
    from megatron_pr2 import PR2Config

    config = make_moe_config(num_layers=1, hidden_size=32, moe_ffn_hidden_size=64)
    pr2_config = PR2Config(cache_tokens_per_sequence=-1, loss_start_ministep=2)
    torch.manual_seed(0)
    layer = build_pr2_moe_layer(config, pr2_config, pg_collection=pg)
    return layer, config


def _event_names(prof):
    return [event.name for event in prof.events()]


def test_replay_trace_has_pr2_ranges(pg, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    from megatron_pr2 import routing

    layer, config = _pr2_layer(pg)
    x = torch.randn(16, 2, config.hidden_size, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as record_prof:
        with routing(layer, "predict_record") as handle:
            with torch.no_grad():
                layer(x)
    routes = handle.routes
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with routing(layer, "replay", routes, ministep=2):
            output, _ = layer(x)
            output.sum().backward()
    trace = tmp_path / "replay.json"
    prof.export_chrome_trace(str(trace))
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    ranges = {e["name"]: e for e in events if e.get("name", "").startswith("pr2/")}
    assert {"pr2/replay", "pr2/predictor"} <= set(ranges), sorted(ranges)
    assert "pr2/record" not in ranges  # replay never records
    # The predictor runs inside the replay range (for the predictor loss at mini-step 2).
    replay, predictor = ranges["pr2/replay"], ranges["pr2/predictor"]
    assert replay["ts"] <= predictor["ts"]
    assert predictor["ts"] + predictor["dur"] <= replay["ts"] + replay["dur"] + 1
    # The predictor did get its gradient in that traced backward pass.
    router = layer.router
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.predictor.parameters())
    # The record pass is labelled pr2/record (with pr2/predictor inside: predict_record).
    record_names = set(_event_names(record_prof))
    assert {"pr2/record", "pr2/predictor"} <= record_names
    assert "pr2/replay" not in record_names


def test_stock_routing_has_no_pr2_ranges(pg):
    from torch.profiler import ProfilerActivity, profile

    layer, config = _pr2_layer(pg)
    x = torch.randn(16, 2, config.hidden_size)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            layer(x)
    assert not [name for name in _event_names(prof) if name.startswith("pr2/")]


def test_ranges_go_to_nvtx_on_cuda(monkeypatch):
    """On CUDA, pr2_range pushes/pops Megatron NVTX ranges (which Megatron emits only when its
    NVTX profiling is on, i.e. under --nvtx-ranges during the profiled steps)."""
    from megatron_pr2 import profiling

    calls = []
    monkeypatch.setattr(profiling, "_use_nvtx", lambda: True)  # torch.cuda.is_available()
    monkeypatch.setattr(profiling, "nvtx_range_push", lambda msg: calls.append(("push", msg)))
    monkeypatch.setattr(profiling, "nvtx_range_pop", lambda msg: calls.append(("pop", msg)))
    with pytest.raises(RuntimeError, match="boom"):
        with profiling.pr2_range("replay"):
            with profiling.pr2_range("predictor"):
                raise RuntimeError("boom")
    # Balanced even when the block raises: an unbalanced NVTX stack corrupts the timeline.
    assert calls == [
        ("push", "pr2/replay"),
        ("push", "pr2/predictor"),
        ("pop", "pr2/predictor"),
        ("pop", "pr2/replay"),
    ]
