# Command line of the RL demo: one run, or the comparison of all routing modes.
#
#   python -m megatron_pr2.rl.demo --compare            # all modes x 2 seeds, table, plots, report
#   python -m megatron_pr2.rl.demo --compare --quick    # smoke-sized comparison (< 2 min)
#   python -m megatron_pr2.rl.demo --mode pr2 --steps 40 --run-dir runs/pr2 [--resume]
#   torchrun --nproc-per-node 2 -m megatron_pr2.rl.demo --mode pr2 --expert-parallel-size 2
#
# Run-dir layout: tokenizer.model, sft-<key>/ (cached warm start, one file per rank),
# compare/<mode>/seed<k>/{tb/, metrics.jsonl, checkpoints/}, plots/*.png, report.md.
# On CPU the comparison runs its independent runs in `--workers` processes (each a gloo world of
# one); results do not depend on the number of workers.

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional

from megatron_pr2.config import LOSS_KINDS
from megatron_pr2.config import PREDICTOR_KINDS as PREDICTORS

# Both modules import no megatron-core (apply_cpu_patches must run first on CPU).
from megatron_pr2.phases import STRATEGIES as MODES

# Default modes of --compare: no replay, R2 and PR2 (once per predictor).
COMPARE_MODES = ("none", "r2", "pr2")


@dataclasses.dataclass
class Preset:
    """Sizes of a demo run (everything per data-parallel rank). The defaults are the drift
    regime (README, "What the demo measured"): 5-15% of expert slots change per update, as
    reported at 30B scale, and RL improves the greedy accuracy of the warm start."""

    num_digits: int = 2
    """Operand digits of the arithmetic task."""
    ops: str = "+"
    """Operators of the task ('+', '-' or '+-'; subtraction is much harder for the tiny model)."""
    sft_steps: int = 800
    """Supervised warm-start steps."""
    sft_label_noise: float = 0.1
    """Fraction of randomly corrupted SFT answers (imperfect demonstrations)."""
    sft_leading_drop: float = 0.65
    """Fraction of SFT answers with a carry digit or minus sign that drop it: a systematic error
    the warm start's greedy answer learns (above 0.5) and RL with a verifier can fix (its
    samples still show the right answer 35% of the time; SFTConfig.leading_drop)."""
    sft_batch_size: int = 64
    """Sequences per SFT step."""
    sft_lr: float = 3e-3
    """SFT peak learning rate."""
    sft_freeze_router: bool = True
    """Keep the router weights at their initialisation during SFT: the experts adapt to a
    router whose logit margins are small, which RL then moves (the router SFT leaves
    unsettled)."""
    steps: int = 40
    """RL steps per run."""
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    group_size: int = 8
    """GRPO group size."""
    num_ministeps: int = 4
    """N mini-steps per rollout batch."""
    lr: float = 1e-4
    """RL base learning rate of the policy. At 3e-4 RL lowered the greedy accuracy of an unseen
    seed with and without the router levers (README, "How the RL settings were chosen")."""
    lr_warmup_iters: int = 0
    """Optimizer steps of linear lr warmup in RL (RLConfig.lr_warmup_iters)."""
    lr_decay_style: str = "constant"
    """RL lr schedule after the warmup: 'constant' or 'cosine' (RLConfig.lr_decay_style)."""
    min_lr_ratio: float = 0.0
    """End of the cosine decay as a fraction of lr (RLConfig.min_lr_ratio)."""
    kl_coeff: float = 0.0
    """beta of the GRPO KL penalty to the warm start (PolicyLossConfig.kl_coeff)."""
    router_lr_mult: float = 10.0
    """RL learning-rate multiplier of the router weights (RLConfig.router_lr_mult): the router
    moves like a large model's (5-15% of the expert slots per update) while the rest of the
    policy takes small steps."""
    router_weight_decay: Optional[float] = None
    """AdamW weight decay of the router weights in RL (None: like the other weights, 0)."""
    router_anchor: float = 100.0
    """Pull of the router weights towards the warm start in RL (RLConfig.router_anchor): with
    router lr 1e-3 it takes back 10% of the router's deviation per update, so the routes keep
    changing at every update without drifting away from those the experts were trained for."""
    aux_loss_coeff: float = 0.01
    """Megatron load-balancing (aux) loss coefficient of the model in SFT."""
    rl_aux_loss_coeff: Optional[float] = 0.1
    """Aux loss coefficient in RL (None: aux_loss_coeff). A stronger balancing pressure keeps
    the router moving towards balance at every update: a steady source of route changes that
    does not stop RL from improving the policy (measured: README)."""
    alpha: float = 3000.0
    """PR2 predictor learning-rate multiplier: predictor lr = alpha x lr = 0.3, a plain gradient
    step (predictor_update "sgd"), with predictor_weight_decay below (the predictor lab's best
    settings; without the decay no lr of the linear head beats R2 in this preset: README)."""
    predictor_update: str = "sgd"
    """PR2Config.predictor_update of the learned predictors."""
    predictor_weight_decay: float = 3.0
    """PR2Config.predictor_weight_decay of the learned predictors: at predictor lr 0.3 each
    update keeps 10% of W_p before adding its gradient step, so the head predicts from the
    last batch's drift instead of the sum of every earlier batch's (under the anchor the router's
    drift does not persist over batches; chosen with the predictor lab, README)."""
    seeds: tuple = (0, 1, 2)
    """RL seeds of the comparison."""
    n1_steps: int = 4
    """Steps of the N=1 identity check (R2 vs PR2 with one mini-step)."""
    eval_problems: int = 256
    """Held-out problems of the final greedy evaluation."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """MoE layers."""
    num_experts: int = 32
    """Routed experts per MoE layer."""
    topk: int = 4
    """Experts per token."""
    moe_ffn_hidden_size: int = 64
    """Hidden size of each expert MLP."""
    lab_dump_fraction: float = 0.0
    """Fraction of the watched tokens each run dumps for the predictor lab (0 = none)."""


PRESETS = {
    "default": Preset(),
    # The same runs, named for what they are for.
    "drift": Preset(),
    "quick": Preset(
        sft_steps=200,
        steps=4,
        prompts_per_step=8,
        group_size=4,
        num_ministeps=2,
        n1_steps=2,
        eval_problems=64,
        seeds=(0, 1),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_pr2.rl.demo",
        description="GRPO on a synthetic arithmetic task with a tiny Megatron-Core MoE GPT; "
        "compares routing modes none / r2 / r3 / pr2 / pr2-r3.",
    )
    p.add_argument("--compare", action="store_true", help="run every mode x seed, write report")
    p.add_argument("--quick", action="store_true", help="smoke-sized preset (< 2 min on 2 cores)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="sizes of the run: default (= drift: router drift like a 30B model, 5-15%% of "
        "expert slots change per update), quick (= --quick, a smoke test)",
    )
    p.add_argument("--mode", choices=MODES, default="pr2", help="routing mode of a single run")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(COMPARE_MODES),
        help="--compare modes (default: none r2 pr2, what the acceptance bar compares, which fits "
        "30 minutes on 2 CPU cores; add r3 pr2-r3 for the rollout-route modes)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a single run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="--compare seeds")
    p.add_argument("--run-dir", default="runs/rl_demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="RL steps (overrides the preset)")
    p.add_argument("--ministeps", type=int, default=None, help="N mini-steps per rollout batch")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per rollout")
    p.add_argument("--group-size", type=int, default=None, help="GRPO samples per prompt")
    p.add_argument("--lr", type=float, default=None, help="RL base learning rate")
    p.add_argument("--alpha", type=float, default=None, help="PR2 predictor lr multiplier")
    p.add_argument(
        "--predictor-weight-decay",
        type=float,
        default=None,
        help="PR2Config.predictor_weight_decay of the learned predictors (preset default 3)",
    )
    p.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default="linear",
        help="PR2 evolution predictor of a single run (PR2Config.predictor)",
    )
    p.add_argument(
        "--predictors",
        nargs="+",
        choices=PREDICTORS,
        default=["lookahead", "linear"],
        help="--compare: every PR2 mode runs once per predictor, labelled <mode>-<predictor>",
    )
    p.add_argument(
        "--pr2-loss",
        choices=LOSS_KINDS,
        default="kl-post",
        help="PR2 predictor objective (PR2Config.loss)",
    )
    p.add_argument("--sft-steps", type=int, default=None, help="supervised warm-start steps")
    p.add_argument("--sft-label-noise", type=float, default=None, help="corrupted SFT fraction")
    p.add_argument("--num-digits", type=int, default=None, help="operand digits")
    p.add_argument("--eval-problems", type=int, default=None, help="held-out greedy eval size")
    p.add_argument("--n1-steps", type=int, default=None, help="steps of the N=1 check")
    p.add_argument("--ops", default=None, help="task operators: '+', '-' or '+-'")
    p.add_argument(
        "--ratio-level",
        choices=("token", "sequence"),
        default="token",
        help="token: PPO/GRPO ratio; sequence: GSPO",
    )
    p.add_argument("--clip-eps", type=float, default=0.2, help="clip range (both sides)")
    p.add_argument("--engine-dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--expert-parallel-size", type=int, default=1)
    p.add_argument("--checkpoint-interval", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="resume a single run from its last checkpoint"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--compare: parallel worker processes (default: 2 on CPU, 1 on GPU)",
    )
    p.add_argument("--no-n1-check", action="store_true", help="skip the N=1 R2==PR2 check")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="--compare: rebuild report, plots and summary from the runs already in --run-dir",
    )
    p.add_argument(
        "--no-checkpoints",
        action="store_true",
        help="write no RL checkpoints (a comparison needs none; they are most of its disk use)",
    )
    p.add_argument(
        "--lab-dump-fraction",
        type=float,
        default=None,
        help="fraction of the watched tokens every run dumps to <run>/lab/ for the offline predictor "
        "lab (python -m benchmarks.predictor_lab)",
    )
    # Megatron-LM's profiling flags (launch/nsys.sh passes them); single runs only.
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile steps [--profile-step-start, --profile-step-end) of a single run: "
        "cudaProfilerStart/Stop on CUDA (for nsys), a torch.profiler trace on CPU",
    )
    p.add_argument("--profile-step-start", type=int, default=10, help="first profiled step")
    p.add_argument("--profile-step-end", type=int, default=12, help="capture stops before it")
    p.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="profiled ranks")
    p.add_argument(
        "--nvtx-ranges",
        action="store_true",
        help="turn on Megatron's NVTX ranges (and PR2's pr2/* ranges) while profiling",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default on CPU: 1; the model's matmuls are too small "
        "to gain from more, and extra threads thrash when workers share the cores)",
    )
    return p


def resolve_preset(args) -> Preset:
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick and --preset {args.preset} contradict each other")
    preset = dataclasses.replace(PRESETS["quick" if args.quick else args.preset or "default"])
    for field, arg in (
        ("steps", "steps"),
        ("num_ministeps", "ministeps"),
        ("prompts_per_step", "prompts_per_step"),
        ("group_size", "group_size"),
        ("lr", "lr"),
        ("alpha", "alpha"),
        ("predictor_weight_decay", "predictor_weight_decay"),
        ("sft_steps", "sft_steps"),
        ("sft_label_noise", "sft_label_noise"),
        ("num_digits", "num_digits"),
        ("ops", "ops"),
        ("eval_problems", "eval_problems"),
        ("n1_steps", "n1_steps"),
        ("lab_dump_fraction", "lab_dump_fraction"),
    ):
        value = getattr(args, arg)
        if value is not None:
            preset = dataclasses.replace(preset, **{field: value})
    if args.seeds is not None:
        preset = dataclasses.replace(preset, seeds=tuple(args.seeds))
    return preset


# ---------------------------------------------------------------------------------------------
# Everything below imports megatron-core: call only after apply_cpu_patches() on CPU.
# ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _configs(preset: Preset, job: dict):
    from megatron_pr2 import PR2Config
    from megatron_pr2.rl.grpo import PolicyLossConfig
    from megatron_pr2.rl.loop import RLConfig
    from megatron_pr2.rl.model import ModelConfig
    from megatron_pr2.rl.sft import SFTConfig
    from megatron_pr2.rl.task import TaskConfig

    task_cfg = TaskConfig(num_digits=preset.num_digits, ops=preset.ops)
    model_cfg = ModelConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_experts=preset.num_experts,
        topk=preset.topk,
        moe_ffn_hidden_size=preset.moe_ffn_hidden_size,
        aux_loss_coeff=preset.aux_loss_coeff,
        max_sequence_length=2 * task_cfg.prompt_chars + 8,
    )
    sft_cfg = SFTConfig(
        steps=preset.sft_steps,
        batch_size=preset.sft_batch_size,
        lr=preset.sft_lr,
        label_noise=preset.sft_label_noise,
        leading_drop=preset.sft_leading_drop,
        freeze_router=preset.sft_freeze_router,
    )
    rl_cfg = RLConfig(
        mode=job["mode"],
        seed=job["seed"],
        steps=job.get("steps", preset.steps),
        prompts_per_step=preset.prompts_per_step,
        group_size=preset.group_size,
        num_ministeps=job.get("num_ministeps", preset.num_ministeps),
        lr=preset.lr,
        lr_warmup_iters=preset.lr_warmup_iters,
        lr_decay_style=preset.lr_decay_style,
        min_lr_ratio=preset.min_lr_ratio,
        router_lr_mult=preset.router_lr_mult,
        router_weight_decay=preset.router_weight_decay,
        router_anchor=preset.router_anchor,
        engine_dtype=job.get("engine_dtype", "bf16"),
        policy=PolicyLossConfig(
            clip_eps_low=job.get("clip_eps", 0.2),
            clip_eps_high=job.get("clip_eps", 0.2),
            ratio_level=job.get("ratio_level", "token"),
            kl_coeff=preset.kl_coeff,
        ),
        pr2=PR2Config(
            predictor=job.get("predictor", "linear"),
            loss=job.get("pr2_loss", "kl-post"),
            alpha=preset.alpha,
            predictor_update=preset.predictor_update,
            predictor_weight_decay=preset.predictor_weight_decay,
            cache_tokens_per_sequence=64,
        ),
        checkpoint_interval=job.get("checkpoint_interval", 0),
        save_checkpoints=job.get("save_checkpoints", True),
        eval_problems=preset.eval_problems,
        lab_dump_fraction=preset.lab_dump_fraction,
    )
    return task_cfg, model_cfg, sft_cfg, rl_cfg


def prepare(run_dir: str, preset: Preset, expert_parallel_size: int = 1):
    """Tokenizer + cached SFT warm start. Returns (task, tokenizer, sft_state, sft_eval)."""
    import torch
    import torch.distributed as dist

    from megatron_pr2.rl.loop import RLTrainer
    from megatron_pr2.rl.model import build_gpt_model, full_state_dict, init_distributed
    from megatron_pr2.rl.sft import (
        run_sft,
        save_state_atomic,
        sft_cache_key,
        sft_checkpoint_file,
    )
    from megatron_pr2.rl.task import ArithmeticTask
    from megatron_pr2.rl.tokenizer import TaskTokenizer, train_tokenizer

    init_distributed(expert_parallel_size, seed=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    task_cfg, model_cfg, sft_cfg, rl_cfg = _configs(preset, {"mode": "none", "seed": 0})
    task = ArithmeticTask(task_cfg)
    os.makedirs(run_dir, exist_ok=True)
    prefix = os.path.join(run_dir, f"tokenizer-d{task_cfg.num_digits}")
    if rank == 0 and not os.path.exists(prefix + ".model"):
        # Trained on both operators, so one tokenizer serves every --ops choice.
        corpus_task = ArithmeticTask(dataclasses.replace(task_cfg, ops="+-"))
        train_tokenizer(corpus_task.corpus(seed=0, n=20000), prefix, vocab_size=64)
    dist.barrier()
    tokenizer = TaskTokenizer(prefix + ".model")
    # The data-parallel size changes the SFT data (one stream per rank); the EP size does not.
    key = sft_cache_key(
        model_cfg, task_cfg, sft_cfg, tokenizer, {"world": world}, {"pr2": "linear"}
    )
    file = sft_checkpoint_file(run_dir, key)
    # The evaluation is cached per problem count: runs with other --eval-problems reuse the SFT.
    eval_file = os.path.join(os.path.dirname(file), f"eval-{preset.eval_problems}.json")
    t0 = time.time()
    if os.path.exists(file):
        _log(f"SFT warm start: cached {os.path.dirname(file)}")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if os.path.exists(eval_file):
            with open(eval_file) as f:
                return task, tokenizer, state, json.load(f)
    else:
        model = build_gpt_model(
            model_cfg, tokenizer.padded_vocab_size(), rl_cfg.pr2, torch.float32, seed=sft_cfg.seed
        )
        seq_length = 1 + task_cfg.prompt_chars + task_cfg.max_answer_chars + 1
        run_sft(model, task, tokenizer, sft_cfg, seq_length, log=_log)
        state = full_state_dict(model)  # collective over EP: every rank calls it
        dist.barrier()
        if rank == 0:
            save_state_atomic(state, file)
    sft_eval, quality = {}, ""
    if preset.eval_problems:
        # Greedy evaluation of the warm start, with the same evaluator as the RL runs.
        trainer = RLTrainer(
            rl_cfg, model_cfg, task, tokenizer, os.path.join(run_dir, "sft-eval"), init_state=state
        )
        sft_eval = trainer.evaluate(preset.eval_problems)
        quality = (
            f", greedy exact match {sft_eval['eval/exact_match']:.3f}, "
            f"reward {sft_eval['eval/reward']:.3f}"
        )
    sft_eval["seconds"] = time.time() - t0
    dist.barrier()
    if rank == 0:
        with open(eval_file + ".tmp", "w") as f:
            json.dump(sft_eval, f)
        os.replace(eval_file + ".tmp", eval_file)
    dist.barrier()
    _log(f"SFT warm start and evaluation: {sft_eval['seconds']:.1f}s{quality}")
    return task, tokenizer, state, sft_eval


def run_job(job: dict) -> dict:
    """One RL run (a compare cell, the N=1 check, or a single run). Runs in a worker process or
    in-process; returns {'history', 'eval', 'params_sha256', 'seconds'}."""
    import torch

    from megatron_pr2.rl.loop import RLTrainer
    from megatron_pr2.rl.step_profiler import ProfileConfig

    preset = Preset(**job["preset"])
    task, tokenizer, state, _ = prepare(job["root"], preset, job.get("ep", 1))
    _, model_cfg, _, rl_cfg = _configs(preset, job)
    if preset.rl_aux_loss_coeff is not None:
        # Same architecture and weights; only the RL runs' balancing loss differs from SFT's.
        model_cfg = dataclasses.replace(model_cfg, aux_loss_coeff=preset.rl_aux_loss_coeff)
    t0 = time.time()
    trainer = RLTrainer(
        rl_cfg,
        model_cfg,
        task,
        tokenizer,
        job["run_dir"],
        init_state=state,
        log=_log if job.get("progress", True) else None,
    )
    profile = job.get("profile")
    history = trainer.train(
        resume=job.get("resume", False),
        progress=job.get("progress", True),
        profile=None if profile is None else ProfileConfig(**profile),
    )
    result = {"history": history, "seconds": time.time() - t0}
    if preset.eval_problems and job.get("evaluate", True):
        result["eval"] = trainer.evaluate(preset.eval_problems)
    digest = hashlib.sha256()
    for name, value in sorted(trainer.model.state_dict().items()):
        if isinstance(value, torch.Tensor) and ".predictor." not in name:
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    result["params_sha256"] = digest.hexdigest()
    return result


_TE_APEX = "Transformer Engine and Apex are not installed"


def quiet_te_apex_warnings(announce: bool = False) -> None:
    """Megatron-Core warns from five modules, in every process, that Transformer Engine and Apex
    are missing (always true on CPU); keep one line instead (announce=True prints it)."""
    import warnings

    warnings.filterwarnings("ignore", message=f".*{_TE_APEX}.*")
    warnings.filterwarnings("ignore", message="Apex is not installed")
    if announce:
        print(
            f"note: {_TE_APEX}: Megatron-Core uses its local (torch) implementations; "
            "expected on CPU (shown once)",
            flush=True,
        )


def _worker(job: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet_te_apex_warnings()
    import torch

    torch.set_num_threads(1)
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    return run_job(job)


def _run_jobs(jobs: List[dict], workers: int) -> List[dict]:
    if workers <= 1:
        return [run_job(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_worker, jobs))


def n1_identity(r2: dict, pr2: dict) -> Dict[str, object]:
    """Compare the N=1 R2 and PR2 runs: every shared per-step metric and the final weights."""
    skip = ("time/",)
    mismatches, compared, max_diff = [], 0, 0.0
    for a, b in zip(r2["history"], pr2["history"]):
        for key in sorted(set(a) & set(b)):
            if key.startswith(skip):
                continue
            compared += 1
            if a[key] != b[key]:
                mismatches.append(f"step {a['step']} {key}: {a[key]!r} vs {b[key]!r}")
                max_diff = max(max_diff, abs(a[key] - b[key]))
    return {
        "steps": len(r2["history"]),
        "metric values compared": compared,
        "mismatching values": len(mismatches),
        "max abs difference": max_diff,
        "final non-predictor weights identical (sha256)": r2["params_sha256"]
        == pr2["params_sha256"],
        "first mismatches": mismatches[:5] or "none",
        "verdict": (
            "IDENTICAL"
            if not mismatches and r2["params_sha256"] == pr2["params_sha256"]
            else "DIFFERENT"
        ),
    }


def compare(args, preset: Preset) -> int:
    import torch

    from megatron_pr2.rl import report

    t_all = time.time()
    root = os.path.abspath(args.run_dir)
    # The warm start is built once here; workers find it cached.
    _, _, _, sft_eval = prepare(root, preset, args.expert_parallel_size)
    t_sft = time.time() - t_all
    workers = args.workers
    if workers is None:
        workers = 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        workers = 1  # under torchrun every rank runs every job in-process
    base = {
        "root": root,
        "preset": dataclasses.asdict(preset),
        "ep": args.expert_parallel_size,
        "ratio_level": args.ratio_level,
        "clip_eps": args.clip_eps,
        "engine_dtype": args.engine_dtype,
        "predictor": args.predictor,
        "pr2_loss": args.pr2_loss,
        "progress": True,
        "save_checkpoints": not args.no_checkpoints,
    }
    jobs = []
    for seed in preset.seeds:
        for mode in args.modes:
            variants = [(mode, None)]
            if mode.startswith("pr2"):
                variants = [(f"{mode}-{p}", p) for p in args.predictors]
            for label, predictor in variants:
                run_dir = os.path.join(root, "compare", label, f"seed{seed}")
                if not args.report_only:
                    _clean_run_dir(run_dir)
                job = {**base, "label": label, "mode": mode, "seed": seed, "run_dir": run_dir}
                if predictor is not None:
                    job["predictor"] = predictor
                jobs.append(job)
    if not args.no_n1_check:
        for mode in ("r2", "pr2"):
            run_dir = os.path.join(root, "n1_check", mode)
            if not args.report_only:
                _clean_run_dir(run_dir)
            jobs.append(
                {
                    **base,
                    # The paper's claim: a learned predictor never trains with N = 1.
                    "predictor": "linear",
                    "mode": mode,
                    "seed": preset.seeds[0],
                    "run_dir": run_dir,
                    "steps": preset.n1_steps,
                    "num_ministeps": 1,
                    "evaluate": False,
                    "progress": False,
                }
            )
    t_runs = time.time()
    results = _load_results(root, jobs) if args.report_only else _run_jobs(jobs, workers)
    t_runs = time.time() - t_runs

    runs: Dict[str, Dict[int, list]] = {}
    evals: Dict[str, Dict[int, dict]] = {}
    run_seconds = []
    n1 = {}
    for job, res in zip(jobs, results):
        if job.get("num_ministeps") == 1:
            if res is not None:
                n1[job["mode"]] = res
            continue
        runs.setdefault(job["label"], {})[job["seed"]] = res["history"]
        evals.setdefault(job["label"], {})[job["seed"]] = res.get("eval", {})
        run_seconds.append(res["seconds"])
    n1_check = n1_identity(n1["r2"], n1["pr2"]) if n1 else None
    if args.report_only:
        n1_check = _saved(root).get("n1_check")
        t_runs = _saved(root).get("timings", {}).get("all RL runs (wall)", t_runs)
    if dist.get_rank() != 0:
        return 0
    labels = list(runs)  # job order: modes as given, PR2 modes once per predictor
    # Each PR2 variant against the replay it builds on (PR2 on R2, PR2 on R3).
    pairs = [(label, "r3" if label.startswith("pr2-r3-") else "r2") for label in labels]
    pairs = [(a, b) for a, b in pairs if a.startswith("pr2-")]
    summary = report.summarize(runs, evals)
    for job, res in zip(jobs, results):
        if job.get("num_ministeps") != 1:
            with open(os.path.join(job["run_dir"], "result.json"), "w") as f:
                json.dump(report.per_seed_results(res["history"], res.get("eval", {})), f, indent=1)
    plots = report.plot_curves(runs, os.path.join(root, "plots"))
    by_ministep = report.plot_ministep_accuracy(
        runs, preset.num_ministeps, os.path.join(root, "plots", "route_accuracy_vs_ministep.png")
    )
    plots += [by_ministep] if by_ministep else []
    settings = {
        "preset": "quick" if args.quick else args.preset or "default",
        "model": f"{preset.num_layers} MoE layers, hidden {preset.hidden_size}, "
        f"{preset.num_experts} experts (ffn {preset.moe_ffn_hidden_size}), top-{preset.topk}, "
        "alltoall dispatcher, fp32 trainer / bf16 engine"
        + (", router kept at its init during SFT" if preset.sft_freeze_router else ""),
        "task": f"{preset.num_digits}-digit arithmetic, ops '{preset.ops}', reward 1 exact / "
        "0.5 x matching-digit fraction; SFT on "
        f"{preset.sft_steps} steps with {preset.sft_label_noise:.0%} corrupted answers and "
        f"{preset.sft_leading_drop:.0%} of carry digits / minus signs dropped",
        "RL": f"{preset.steps} steps x {preset.prompts_per_step} prompts x group "
        f"{preset.group_size}, N={preset.num_ministeps} mini-steps, lr {preset.lr}, router lr "
        f"x{preset.router_lr_mult:g}, router weight decay {preset.router_weight_decay}, router "
        f"anchor {preset.router_anchor:g}, aux loss {preset.rl_aux_loss_coeff}, "
        f"{args.ratio_level}-level ratio, clip eps "
        f"{args.clip_eps}",
        "PR2 predictors": ", ".join(args.predictors) + " (lookahead: no learned parameters, W_p = "
        "0.5 x the router weight's change over the previous rollout batch; learned ones: "
        f"{args.pr2_loss} loss from mini-step 2, alpha {preset.alpha} = predictor lr "
        f"{preset.lr * preset.alpha:g} ({preset.predictor_update} update, weight decay "
        f"{preset.predictor_weight_decay:g}), gradient clipped "
        "separately from the policy's)",
        "N=1 check": "R2 vs PR2 with the learned linear predictor",
        "seeds": list(preset.seeds),
        "world size": dist.get_world_size(),
        "workers": workers,
    }
    timings = {
        "SFT warm start (or cache load)": t_sft,
        "all RL runs (wall)": t_runs,
        "mean RL run": sum(run_seconds) / max(1, len(run_seconds)),
        "total": time.time() - t_all,
    }
    if args.report_only:
        timings = {**_saved(root).get("timings", {}), "report rebuilt in": time.time() - t_all}
    report_path = os.path.join(root, "report.md")
    per_ministep = report.ministep_tables(runs, preset.num_ministeps)
    report.write_report(
        report_path,
        summary,
        labels,
        preset.seeds,
        settings,
        n1_check,
        plots,
        timings,
        sft_eval,
        per_ministep,
        pairs,
        [a for a, b in pairs if b == "r2"],
        smoke_test=args.quick or args.preset == "quick",
        health=report.health_table(runs),
    )
    print()
    if args.quick or args.preset == "quick":
        print("SMOKE TEST (--quick): these numbers show the pipeline works, nothing more.\n")
    print(report.text_table(summary, labels))
    print()
    for line in report.headline(summary, pairs + [("r2", "none")]):
        print(line)
    for line in report.bar_check(summary, [a for a, b in pairs if b == "r2"], sft_eval):
        print(line)
    if n1_check is not None:
        print(
            f"\nN=1 check (R2 vs PR2, {n1_check['steps']} steps): {n1_check['verdict']} "
            f"({n1_check['mismatching values']} of {n1_check['metric values compared']} "
            "values differ)"
        )
    print(f"\nreport: {report_path}\nplots: {', '.join(plots)}")
    print(f"total {timings['total']:.1f}s")
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(
            {
                "summary": {
                    label: {k: c._asdict() for k, c in row.items() if c.mean is not None}
                    for label, row in summary.items()
                },
                "n1_check": n1_check,
                "timings": timings,
            },
            f,
            indent=1,
            default=str,
        )
    return 0 if n1_check is None or n1_check["verdict"] == "IDENTICAL" else 1


def _saved(root: str) -> dict:
    path = os.path.join(root, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _load_results(root: str, jobs: List[dict]) -> List[dict]:
    """--report-only: every comparison run's history and evaluation from its run dir (the
    N = 1 check and timings come from the saved summary.json)."""
    out = []
    for job in jobs:
        if job.get("num_ministeps") == 1:
            out.append(None)
            continue
        path = os.path.join(job["run_dir"], "tb", "metrics.jsonl")
        if not os.path.exists(path):
            raise ValueError(f"--report-only: {path} is missing; run the comparison first")
        with open(path) as f:
            history = [json.loads(line) for line in f if line.strip()]
        result_file = os.path.join(job["run_dir"], "result.json")
        evaluation = {}
        if os.path.exists(result_file):
            with open(result_file) as f:
                evaluation = json.load(f).get("eval", {})
        out.append({"history": history, "eval": evaluation, "seconds": 0.0})
    return out


def _clean_run_dir(run_dir: str) -> None:
    """A comparison cell always starts fresh (stale checkpoints would be resumed otherwise)."""
    import shutil

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def single(args, preset: Preset) -> int:
    root = os.path.abspath(args.run_dir)
    job = {
        "root": root,
        "preset": dataclasses.asdict(preset),
        "ep": args.expert_parallel_size,
        "mode": args.mode,
        "seed": args.seed,
        "run_dir": os.path.join(root, "runs", f"{args.mode}-seed{args.seed}"),
        "ratio_level": args.ratio_level,
        "clip_eps": args.clip_eps,
        "engine_dtype": args.engine_dtype,
        "predictor": args.predictor,
        "pr2_loss": args.pr2_loss,
        "checkpoint_interval": args.checkpoint_interval,
        "resume": args.resume,
        "profile": profile_config(args),
    }
    t0 = time.time()
    res = run_job(job)
    last = res["history"][-1] if res["history"] else {}
    _log(f"done in {time.time() - t0:.1f}s; run dir {job['run_dir']}")
    if "eval" in res:
        _log(f"greedy eval: {res['eval']}")
    if last:
        _log(f"last step reward {last['rl/reward']:.3f}")
    return 0


def profile_config(args) -> Optional[dict]:
    """The --profile* flags as ProfileConfig fields (validated), or None without --profile."""
    if not args.profile:
        return None
    from megatron_pr2.rl.step_profiler import ProfileConfig

    return dataclasses.asdict(
        ProfileConfig(
            step_start=args.profile_step_start,
            step_end=args.profile_step_end,
            ranks=tuple(args.profile_ranks),
            nvtx_ranges=args.nvtx_ranges,
        )
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile and args.compare:
        parser.error("--profile captures one run: use it without --compare")
    try:
        profile_config(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        preset = resolve_preset(args)
    except ValueError as err:
        parser.error(str(err))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)
    if not torch.cuda.is_available():
        quiet_te_apex_warnings(announce=True)
        # Explicit, before the first megatron-core import (needed on megatron-core 0.19).
        from megatron_pr2.cpu import apply_cpu_patches

        apply_cpu_patches()
    if args.compare:
        return compare(args, preset)
    return single(args, preset)


if __name__ == "__main__":
    sys.exit(main())
