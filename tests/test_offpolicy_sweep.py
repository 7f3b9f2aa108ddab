# The off-policy sweep driver end to end on a micro budget (subprocess: it sets up its own
# single-rank Megatron world): N = 1 and 2, R2 and PR2, one seed; N = 1 R2 == PR2, the report,
# the plots and the per-run results.

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_offpolicy_sweep_micro(tmp_path):
    argv = ["-m", "benchmarks.offpolicy_sweep", "--run-dir", str(tmp_path), "--workers", "1"]
    argv += ["--ministeps", "1", "2", "--modes", "r2", "pr2", "--predictors", "linear"]
    argv += ["--seeds", "0", "--steps", "2", "--set", "sft_steps=3", "prompts_per_step=2"]
    argv += ["group_size=2", "eval_problems=4", "num_experts=8", "moe_ffn_hidden_size=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "sweep.md").read_text()
    assert "N = 1, R2 vs PR2 (linear head) bit-identical per seed: {0: 'IDENTICAL'}" in text
    assert "## clip fraction" in text and "## Bar at N = 2" in text
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert set(summary["1"]) == set(summary["2"]) == {"r2", "pr2-linear"}
    for name in ("rl_clip_fraction_vs_N.png", "route_accuracy_ge2_vs_N.png"):
        assert (tmp_path / "plots" / name).exists()
    result = json.loads((tmp_path / "N2" / "pr2-linear" / "seed0" / "result.json").read_text())
    assert "drift/replayed_topk_accuracy/ministep_2" in result["per_ministep"]
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
