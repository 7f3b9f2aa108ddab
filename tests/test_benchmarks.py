# Smoke tests of the benchmark scripts on a micro shape: they run, print the ratios and write
# consistent JSON. No timing assertions (timings depend on the machine and its load).
#
# Each script runs in a subprocess: the benchmarks set up their own single-rank Megatron world,
# which must not leak into the parallel state of other tests in this pytest process.

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", *args, "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out) as f:
        return proc.stdout, json.load(f)


@pytest.fixture(scope="module")
def router_run(tmp_path_factory):
    return _run(
        [
            "-m",
            "benchmarks.bench_router",
            "--shapes",
            "micro",
            "--repeats",
            "2",
            "--router-repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--parts",
            "layer,router,layer_fwd,router_fwd",
        ],
        tmp_path_factory.mktemp("router"),
        "router",
    )


TARGET_RATIOS = ("predict_record / stock", "replay+ploss / stock", "pr2 replay / megatron replay")


def test_bench_router_prints_ratios(router_run):
    stdout, _ = router_run
    for part in ("layer", "router", "layer_fwd", "router_fwd"):
        assert f"] {part}: paired per-round ratios" in stdout, stdout
    for label in TARGET_RATIOS:
        lines = [line for line in stdout.splitlines() if line.strip().startswith(label)]
        # One line per timed part, plus one per derived layer-ratio table.
        assert len(lines) == 6, (label, lines)
        for line in lines:
            float(line.split()[len(label.split())])  # the ratio right after the label


def test_bench_router_json(router_run):
    _, results = router_run
    (entry,) = results["shapes"].values()
    assert entry["shape"]["tokens"] == 128 and entry["cached_tokens"] > 0
    for part in ("layer", "router", "layer_fwd", "router_fwd"):
        summary = entry["parts"][part]
        assert set(summary["times_ms"]) >= {"stock", "megatron_replay", "pr2_replay_ploss+tel"}
        for stats in summary["times_ms"].values():
            assert stats["n"] == 2 and 0 < stats["min"] <= stats["median"] <= stats["max"]
        for label in TARGET_RATIOS:
            ratio = summary["ratios"][label]
            assert math.isfinite(ratio["median"]) and ratio["median"] > 0
            assert ratio["target"] is not None
    for label in TARGET_RATIOS:
        assert math.isfinite(entry["derived_layer_ratios"][label])
        assert math.isfinite(entry["derived_layer_fwd_ratios"][label])
    counts = entry["op_counts"]
    # Outside a routing() context the PR2 router runs exactly the stock router's ops.
    assert counts["pr2_off"] == counts["stock"], counts
    # Megatron's replay gathers instead of top-k: same op count give or take one.
    assert abs(counts["megatron_replay"]["compute_ops"] - counts["stock"]["compute_ops"]) <= 2
    # Telemetry adds work to replay; it must never remove any.
    assert counts["pr2_replay+tel"]["compute_ops"] > counts["pr2_replay"]["compute_ops"]
    # The same counts for the no-grad router forward (the RL record pass).
    counts_fwd = entry["op_counts_fwd"]
    assert counts_fwd["pr2_off"] == counts_fwd["stock"], counts_fwd
    assert counts_fwd["stock"]["compute_ops"] < counts["stock"]["compute_ops"]


def test_bench_storage(tmp_path):
    stdout, results = _run(["benchmarks/bench_storage.py"], tmp_path, "storage")
    check = results["real_record_check"]
    assert check["ok"], check
    rows = {(r["experts"], r["topk"]): r for r in results["bytes_per_token_layer"]}
    # 7 bits per id for 128 experts: top-8 packs into 7 bytes per token per layer.
    assert rows[(128, 8)]["routebatch"] == pytest.approx(7.0)
    assert rows[(256, 8)]["routebatch"] == pytest.approx(8.0)
    for layout in results["layouts"]:
        step = layout["routes"]["step_bytes_per_rank"]
        assert 0 < step["sharded"] < step["dp_bcast"] < step["bcast"]
        stages = layout["routes"]["moe_layers_per_stage"]
        assert (
            sum(stages)
            == layout["routes"]["layout"]["num_layers"] - layout["routes"]["layout"]["first_dense"]
        )
        assert 0 < layout["cache"]["cache_over_activation_per_layer"] < 1
    assert "per step per rank" in stdout and "predictor cache" in stdout


def test_bench_host(tmp_path):
    stdout, results = _run(
        [
            "-m",
            "benchmarks.bench_host",
            "--layers",
            "1,2",
            "--tokens",
            "256",
            "--experts",
            "8",
            "--topk",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
        ],
        tmp_path,
        "host",
    )
    assert [run["layers"] for run in results["runs"]] == [1, 2]
    for run in results["runs"]:
        for key in ("enter", "first", "exit", "megatron", "stock", "pr2_total"):
            assert math.isfinite(run[key]) and run[key] >= 0, (key, run)
        assert run["megatron_total"] == pytest.approx(run["layers"] * run["megatron"])
    assert math.isfinite(results["runs"][1]["rest"])
    assert "PR2 extra" in stdout


def test_report_renders_router_results(router_run, tmp_path):
    _, results = router_run
    path = tmp_path / "router.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for label in TARGET_RATIOS:
        assert f"| {label} (" in proc.stdout, proc.stdout
    assert "| variant | compute ops" in proc.stdout


def test_bench_dispatch_plan(tmp_path):
    stdout, results = _run(
        ["-m", "benchmarks.bench_dispatch_plan", "--ep", "2", "--layers", "2"]
        + ["--microbatches", "2", "--seq", "16", "--repeats", "2", "--warmup", "1"],
        tmp_path,
        "dispatch_plan",
    )
    # 2 layers x 2 microbatches of per-layer count gathers without the plan, one with it.
    assert results["exchanges"] == {"off": 4, "plan": 1}
    assert results["identical_outputs"] is True
    assert math.isfinite(results["ratio"]["median"]) and results["ratio"]["median"] > 0
    assert "plan / off" in stdout


def test_sim_scale_one_rank_of_a_fake_world(tmp_path):
    # One rank of a 256-rank fake world at a small size (the README's table is at full size).
    stdout, results = _run(
        ["-m", "benchmarks.sim_scale", "--layouts", "qwen3-30b-tp2-pp4-ep8"]
        + ["--microbatches", "8", "--seq", "1024", "--cache-tokens", "128"],
        tmp_path,
        "sim",
    )
    (r,) = results["results"]
    assert r["world"] == 256 and r["megatron_pr2"].startswith(REPO)
    assert r["t_local"] == 1024 // 2 and r["stage_layers"] == 12  # TP2 + SP, 48 layers / PP4
    # The plan receives exactly its local experts' counts: [M, L, W, E / ep] int32.
    assert r["bytes_received"] == r["plan_min_received_bytes"] == 8 * 12 * 8 * 16 * 4
    assert 1.0 <= r["device_peak_bytes"] / r["in_flight_min_bytes"] <= 2.0
    assert r["residency_peak_microbatches"] <= 2 and r["uploads"] == 8
    assert "| qwen3-30b-tp2-pp4-ep8 (256) |" in stdout


def test_gpu_check_says_no_cuda():
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.gpu_check", "--json", os.devnull],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 2:
        assert "no CUDA device" in proc.stdout
    else:  # a machine with a GPU ran the checks
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
