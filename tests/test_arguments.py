# --pr2-* command-line flags: the extra_args_provider on a plain argparse parser (how Megatron-LM's
# pretrain(extra_args_provider=add_pr2_args) calls it, and the only path on megatron-core 0.16.1,
# whose wheel has no megatron.training) and through megatron.training's own parser (0.19.2);
# errors that name the flag; the predictor learning rate handed to get_megatron_optimizer.

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_pr2.arguments import (
    STRATEGIES,
    add_pr2_args,
    dest_of,
    flag_of,
    megatron_optimizer_kwargs,
    pr2_config_from_args,
    pr2_optimizer_config_overrides,
)
from megatron_pr2.config import PR2Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MEGATRON_TRAINING = importlib.util.find_spec("megatron.training") is not None

# A Megatron-LM pretraining argv (MoE GPT, EP 2) followed by every PR2 flag set off-default.
MEGATRON_ARGV = [
    "--num-layers", "4",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--seq-length", "32",
    "--max-position-embeddings", "32",
    "--micro-batch-size", "2",
    "--global-batch-size", "8",
    "--lr", "1e-4",
    "--min-lr", "1e-5",
    "--train-iters", "10",
    "--num-experts", "8",
    "--moe-router-topk", "2",
    "--moe-token-dispatcher-type", "alltoall",
    "--expert-model-parallel-size", "2",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "128",
    "--mock-data",
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
]  # fmt: skip
PR2_ARGV = [
    "--pr2-mode", "pr2-r3",
    "--pr2-predictor", "lowrank",
    "--pr2-predictor-rank", "8",
    "--pr2-loss", "delta-kl",
    "--pr2-loss-coeff", "0.5",
    "--pr2-alpha", "1000",
    "--pr2-cache-tokens-per-sequence", "-1",
    "--pr2-loss-start-ministep", "3",
    "--pr2-missing-route-policy", "fallback",
    "--no-pr2-telemetry",
]  # fmt: skip
EXPECTED = PR2Config(
    predictor="lowrank",
    predictor_rank=8,
    loss="delta-kl",
    loss_coeff=0.5,
    alpha=1000.0,
    cache_tokens_per_sequence=-1,
    loss_start_ministep=3,
    missing_route_policy="fallback",
    telemetry=False,
)
# The flags launch/nsys.sh appends (Megatron-LM's profiling flags).
PROFILE_ARGV = ["--profile", "--profile-step-start", "3", "--profile-step-end", "5"]
PROFILE_ARGV += ["--profile-ranks", "0", "1", "--nvtx-ranges"]


def _megatron_like_parser() -> argparse.ArgumentParser:
    """What Megatron-LM's parse_args builds before calling the extra_args_provider: its own
    flags (a handful stand in for them here; unknown ones are kept for Megatron)."""
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    group = parser.add_argument_group(title="network size")
    group.add_argument("--num-layers", type=int)
    group.add_argument("--num-experts", type=int)
    group.add_argument("--lr", type=float)
    return parser


def test_one_flag_per_field_with_docs_and_defaults():
    parser = add_pr2_args(_megatron_like_parser())
    (group,) = [g for g in parser._action_groups if g.title == "PR2"]
    actions = {a.dest: a for a in group._group_actions}
    docs = PR2Config.field_docs()
    assert set(actions) == {"pr2_mode"} | {dest_of(f.name) for f in dataclasses.fields(PR2Config)}
    for f in dataclasses.fields(PR2Config):
        action = actions[dest_of(f.name)]
        assert flag_of(f.name) in action.option_strings
        assert action.default == f.default
        assert docs[f.name] and action.help.startswith(docs[f.name].replace("%", "%%"))
    assert actions["pr2_mode"].choices == STRATEGIES and actions["pr2_mode"].default == "none"
    # Defaults give the default config; the help renders (argparse %-formats it).
    assert pr2_config_from_args(parser.parse_args([])) == PR2Config()
    help_text = parser.format_help()
    assert "--pr2-loss-start-ministep" in help_text and "--no-pr2-telemetry" in help_text


def test_full_argv_plain_argparse_path():
    """megatron-core 0.16.1 (no megatron.training): Megatron-LM's parser + add_pr2_args."""
    parser = add_pr2_args(_megatron_like_parser())
    args, rest = parser.parse_known_args(MEGATRON_ARGV + PR2_ARGV)
    assert args.num_layers == 4 and args.num_experts == 8 and args.lr == 1e-4
    assert args.pr2_mode == "pr2-r3"
    assert pr2_config_from_args(args) == EXPECTED
    assert not [token for token in rest if token.startswith("--pr2")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pr2-alpha", "0"], "--pr2-alpha=0: must be > 0"),
        (["--pr2-alpha", "-2.5"], "--pr2-alpha=-2.5: must be > 0"),
        (["--pr2-loss-coeff", "-1"], "--pr2-loss-coeff=-1: must be >= 0"),
        (["--pr2-predictor-rank", "0"], "--pr2-predictor-rank=0: must be an integer >= 1"),
        (["--pr2-cache-tokens-per-sequence", "-2"], "--pr2-cache-tokens-per-sequence=-2: "),
        (["--pr2-loss-start-ministep", "0"], "--pr2-loss-start-ministep=0: must be"),
    ],
)
def test_bad_values_name_the_flag(argv, message):
    args = add_pr2_args(_megatron_like_parser()).parse_args(argv)
    with pytest.raises(ValueError) as error:
        pr2_config_from_args(args)
    assert str(error.value).startswith(message), str(error.value)
    assert "PR2Config." not in str(error.value)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--pr2-predictor", "mlp"], "--pr2-predictor"),
        (["--pr2-mode", "r4"], "--pr2-mode"),
        (["--pr2-loss", "kl"], "--pr2-loss"),
        (["--pr2-alpha", "big"], "--pr2-alpha"),
    ],
)
def test_parse_errors_name_the_flag(argv, flag, capsys):
    parser = add_pr2_args(_megatron_like_parser())
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_mode_is_checked_on_namespaces_not_from_the_parser():
    with pytest.raises(ValueError, match="--pr2-mode=r5: must be one of"):
        pr2_config_from_args(argparse.Namespace(pr2_mode="r5"))


def _optimizer_config(**kwargs):
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**kwargs)


def test_optimizer_overrides_give_the_predictor_alpha_lr():
    config = _optimizer_config(lr=2e-4, min_lr=2e-5, weight_decay=0.1)
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    args = add_pr2_args(_megatron_like_parser()).parse_args(["--pr2-alpha", "100"])
    overrides = megatron_optimizer_kwargs(args, config)["config_overrides"]
    standard = get_standard_config_overrides(config=config)
    predictor_key = ParamKey(attr="pr2_predictor")
    assert set(overrides) == set(standard) | {predictor_key}
    assert overrides[predictor_key]["max_lr"] == pytest.approx(100 * 2e-4)
    assert overrides[predictor_key]["min_lr"] == pytest.approx(100 * 2e-5)
    assert overrides[predictor_key]["wd_mult"] == 0.0
    # The key matches tagged parameters only.
    import torch

    tagged, plain = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    tagged.pr2_predictor = True
    assert predictor_key.matches(tagged, "x.router.predictor.weight")
    assert not predictor_key.matches(plain, "x.router.weight")
    # Given overrides are extended, not replaced or mutated.
    mine = {ParamKey(name="*.foo"): {"wd_mult": 0.5}}
    merged = pr2_optimizer_config_overrides(config, 10.0, mine)
    assert set(merged) == {ParamKey(name="*.foo"), predictor_key} and len(mine) == 1


def test_optimizer_kwargs_from_megatron_args_and_errors():
    args = add_pr2_args(_megatron_like_parser()).parse_args(["--lr", "1e-3", "--pr2-alpha", "7"])
    args.min_lr = 0.0
    _optimizer_config()  # CPU patches before megatron.core.optimizer is imported
    overrides = megatron_optimizer_kwargs(args)["config_overrides"]
    (predictor,) = [v for k, v in overrides.items() if k.attr == "pr2_predictor"]
    assert predictor["max_lr"] == pytest.approx(7e-3) and predictor["min_lr"] == 0.0
    args.pr2_alpha = 0.0
    with pytest.raises(ValueError, match="--pr2-alpha=0: must be > 0"):
        megatron_optimizer_kwargs(args)
    args.pr2_alpha, args.lr = 7.0, None
    with pytest.raises(ValueError, match="--lr is required"):
        megatron_optimizer_kwargs(args)


# ---------------------------------------------------------------------------------------------
# megatron.training's own parser (megatron-core 0.19.2 wheel)
# ---------------------------------------------------------------------------------------------
def _megatron_training_parse_main():
    """Runs in a fresh process: parse_and_validate_args with add_pr2_args. Prints RESULT<json>."""
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    from megatron_pr2.megatron_lm import import_megatron_training

    import_megatron_training()
    from megatron.training.arguments import parse_and_validate_args, parse_args

    os.environ["WORLD_SIZE"] = "2"  # EP 2 needs two ranks in validate_args
    out = {}
    sys.argv = ["pretrain_gpt.py"] + MEGATRON_ARGV + PR2_ARGV + PROFILE_ARGV
    args = parse_and_validate_args(extra_args_provider=add_pr2_args)
    config = pr2_config_from_args(args)
    out["config"] = dataclasses.asdict(config)
    out["mode"] = args.pr2_mode
    out["megatron"] = [args.num_experts, args.expert_model_parallel_size, args.lr]
    out["profile"] = [
        args.profile,
        args.profile_step_start,
        args.profile_step_end,
        args.profile_ranks,
        args.nvtx_ranges,
    ]
    sys.argv = ["pretrain_gpt.py"] + MEGATRON_ARGV + ["--pr2-alpha", "0"]
    try:
        pr2_config_from_args(parse_args(extra_args_provider=add_pr2_args))
    except ValueError as error:
        out["bad_value"] = str(error)
    sys.argv = ["pretrain_gpt.py"] + MEGATRON_ARGV + ["--pr2-predictor", "mlp"]
    try:
        parse_args(extra_args_provider=add_pr2_args)
    except SystemExit as error:
        out["bad_choice_exit"] = error.code
    print("RESULT" + json.dumps(out))


@pytest.mark.skipif(
    not HAS_MEGATRON_TRAINING,
    reason="megatron-core 0.16.1's wheel has no megatron.training (a Megatron-LM checkout has it)",
)
def test_full_argv_through_megatron_training():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), REPO])
    code = "import test_arguments as t; t._megatron_training_parse_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    result = json.loads(lines[-1][len("RESULT") :])
    assert PR2Config(**result["config"]) == EXPECTED
    assert result["mode"] == "pr2-r3"
    assert result["megatron"] == [8, 2, 1e-4]
    assert result["profile"] == [True, 3, 5, [0, 1], True]
    assert result["bad_value"] == "--pr2-alpha=0: must be > 0"
    assert result["bad_choice_exit"] == 2
    assert "argument --pr2-predictor: invalid choice: 'mlp'" in proc.stderr


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_start_ministep", True, "must be of type int"),  # a bool is an int to isinstance
        ("predictor_rank", 4.0, "must be of type int"),
        ("cache_tokens_per_sequence", "64", "must be of type int"),
        ("telemetry_stride", False, "must be of type int"),
        ("alpha", "100", "must be of type float"),
        ("loss_coeff", True, "must be of type float"),
        ("alpha", float("inf"), "must be finite"),
        ("telemetry", 1, "must be of type bool"),
        ("predictor", None, "must be of type str"),
    ],
)
def test_config_field_types_are_strict(field, value, message):
    with pytest.raises(ValueError) as error:
        PR2Config(**{field: value})
    assert str(error.value) == f"PR2Config.{field}={value!r}: {message}", str(error.value)


def test_config_accepts_ints_for_floats_and_numpy_integers():
    np = pytest.importorskip("numpy")
    config = PR2Config(alpha=50, predictor_rank=np.int64(8), loss_coeff=0)
    assert config.alpha == 50 and config.predictor_rank == 8
