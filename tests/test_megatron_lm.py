# Megatron-LM integration hooks: phase x mode routing, route feeding through Megatron's pipeline
# schedules, PR2 metrics through Megatron's MoE metrics tracker, the model provider, the predictor
# learning rate in get_megatron_optimizer, and the runtime patch of megatron.training.
#
# Multi-rank checks run on gloo ranks (harness.run_distributed): a tiny GPTModel with MoE layers
# only in its second half, so under PP = 2 the first pipeline stage holds no MoE layer and must
# still join every metrics reduction. Expected metric values are recomputed from the per-rank
# handles (all-gathered) and compared at 1e-6 (float32 tracker tensors).

import importlib.util
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from harness import build_tiny_gpt, init_megatron_parallel, make_moe_config, run_distributed

VOCAB, SEQ, MBS, NUM_MICROBATCHES = 64, 16, 2, 4
MOE_LAYER_FREQ = [0, 0, 1, 1]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MEGATRON_TRAINING = importlib.util.find_spec("megatron.training") is not None


# ---------------------------------------------------------------------------------------------
# Pure functions (no process group)
# ---------------------------------------------------------------------------------------------
def _megatron_lm():
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()  # megatron-core 0.19 imports triton in MoE modules without it
    from megatron_pr2 import megatron_lm

    return megatron_lm


def test_phase_routing_table():
    m = _megatron_lm()
    expected = {
        # mode: (rollout, old_logprob, train)
        "none": ("off", "off", "off"),
        "r2": ("off", "record", "replay"),
        "r3": ("record", "replay", "replay"),
        "pr2": ("off", "predict_record", "replay"),
        "pr2-r3": ("predict_record", "replay", "replay"),
    }
    for mode, modes in expected.items():
        got = tuple(m.phase_routing_mode(phase, mode) for phase in m.PHASES)
        assert got == modes, (mode, got)
    with pytest.raises(ValueError, match="--pr2-mode=r4"):
        m.phase_routing_mode("train", "r4")
    with pytest.raises(ValueError, match="phase='eval'"):
        m.phase_routing_mode("eval", "r2")


def test_layer_numbers_and_split_routes():
    m = _megatron_lm()
    assert m.moe_layer_numbers(4, MOE_LAYER_FREQ) == [3, 4]
    assert m.moe_layer_numbers(6, 2) == [1, 3, 5]
    assert m.moe_layer_numbers(4, MOE_LAYER_FREQ, mtp_num_layers=2) == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="moe_layer_freq has 3 entries"):
        m.moe_layer_numbers(4, [1, 1, 1])
    assert m.split_routes(list("abcdef"), 3) == [list("abc"), list("def")]
    with pytest.raises(ValueError, match="num_microbatches=4"):
        m.split_routes(list("abcdef"), 4)


def test_routing_for_phase_argument_errors():
    m = _megatron_lm()
    dense = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="replays recorded routes"):
        with m.routing_for_phase(dense, "train", "r2"):
            pass
    with pytest.raises(ValueError, match="takes no routes"):
        with m.routing_for_phase(dense, "old_logprob", "r2", routes=[]):
            pass
    # A model chunk without MoE layers (a dense pipeline stage) has nothing to route.
    with m.routing_for_phase(dense, "train", "pr2", routes=["unused"]) as handle:
        assert handle is None


# ---------------------------------------------------------------------------------------------
# Multi-rank: PP2 x DP2 with a dense first stage
# ---------------------------------------------------------------------------------------------
def _config():
    return make_moe_config(
        num_layers=4,
        moe_layer_freq=MOE_LAYER_FREQ,
        hidden_size=32,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=64,
        num_attention_heads=4,
        pipeline_dtype=torch.float32,
    )


def _stock_provider(config):
    # Megatron-LM's providers build the block spec inside, as this one does: the decoder block
    # spec honours moe_layer_freq and the pipeline stage's layer offset.
    def provider(pre_process=True, post_process=True, vp_stage=None, config=config, **kwargs):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
        return build_tiny_gpt(config, VOCAB, SEQ, pre_process, post_process, spec=spec)

    return provider


def _microbatches(seed):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=generator)
        out.append(
            dict(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                position_ids=torch.arange(SEQ).expand(MBS, SEQ),
                attention_mask=torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None],
            )
        )
    return out


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _schedule_kwargs(data, forward_only):
    return dict(
        forward_step_func=_forward_step,
        data_iterator=iter(data),
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=forward_only,
    )


def _seed(seed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _perturb_routers(model, seed):
    """Simulate a policy update: move every router's weight (same on all DP ranks)."""
    from megatron_pr2 import pr2_routers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in pr2_routers(model):
            router.weight.add_(torch.randn(router.weight.shape, generator=generator) * 0.02)


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (float(value), step)


def _rank_pipeline_hooks():
    _megatron_lm()  # CPU patches before the first megatron-core import of this rank
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_pr2.megatron_lm as m
    from megatron_pr2 import PR2Config, PR2Router, compat, pr2_routers

    with init_megatron_parallel(pp=2, seed=1234):
        config = _config()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        pr2_config = PR2Config(cache_tokens_per_sequence=-1)

        # The provider path: same weights as the stock provider, PR2 routers only where MoE.
        _seed(5)
        stock = _stock_provider(config)(pre_process=stage == 0, post_process=stage == 1)
        _seed(5)
        model = m.pr2_model_provider(_stock_provider(config), pr2_config)(
            pre_process=stage == 0, post_process=stage == 1
        )
        ours, theirs = model.state_dict(), stock.state_dict()
        missing, unexpected = set(ours) - set(theirs), set(theirs) - set(ours)
        # Built from the same seed: the stock weights, bit for bit (the predictor is extra).
        same_weights = all(
            torch.equal(ours[k], v) for k, v in theirs.items() if isinstance(v, torch.Tensor)
        )
        routers = pr2_routers(model)
        info = dict(
            stage=stage,
            dp_rank=dp_rank,
            num_pr2_routers=len(routers),
            all_pr2=all(isinstance(r, PR2Router) for r in routers),
            missing=sorted(missing),
            unexpected=sorted(unexpected),
            same_weights=same_weights,
        )

        data = _microbatches(seed=100 + dp_rank)
        fbf = get_forward_backward_func()

        # Old-policy pass (PR2 on R2: predictive record) over the 1F1B schedule.
        _, record = m.forward_backward_with_routes(
            fbf, model=model, phase="old_logprob", mode="pr2", **_schedule_kwargs(data, True)
        )
        routes = [] if record is None else record.routes_per_microbatch
        _perturb_routers(model, seed=7)
        # A pre-existing Megatron aux-loss entry must survive the PR2 report untouched.
        compat.save_to_aux_losses_tracker(
            "load_balancing_loss", torch.tensor(0.25), 3, 4, reduce_group=None
        )
        losses, handle = m.forward_backward_with_routes(
            fbf,
            model=model,
            phase="train",
            mode="pr2",
            routes=routes if record is not None else [None] * NUM_MICROBATCHES,
            ministep=2,
            **_schedule_kwargs(data, False),
        )
        predictor_grads = [
            float(p.grad.abs().sum()) for r in routers for p in r.predictor.parameters()
        ]
        local = None if handle is None else (handle.layer_ids, handle.metrics)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        writer = _Writer()
        report = m.report_pr2_metrics(
            handle,
            iteration=3,
            writer=writer,
            num_layers=4,
            moe_layer_freq=MOE_LAYER_FREQ,
            per_layer_logging=True,
        )
        left = sorted(compat.get_moe_layer_wise_logging_tracker())
        lbl = compat.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].tolist()

        # The same through pr2_step and a wrapped forward_backward_func (train_step's path).
        wrapped = m.wrap_forward_backward_func(fbf)
        with m.pr2_step("old_logprob", "r2") as step:
            wrapped(model=model, **_schedule_kwargs(data, True))
        step_routes = step.recorded_routes
        n_routes = len(step_routes)
        with m.pr2_step("train", "r2", routes=step_routes or [None] * NUM_MICROBATCHES):
            wrapped(model=model, **_schedule_kwargs(data, False))
        last = m.last_train_handle()
        unconsumed = None
        try:
            with m.pr2_step("train", "r2", routes=(step_routes or [None] * 4) * 2):
                wrapped(model=model, **_schedule_kwargs(data, False))
        except RuntimeError as error:
            unconsumed = str(error)
        report_r2 = m.report_pr2_metrics(last, 4, num_layers=4, moe_layer_freq=MOE_LAYER_FREQ)

        return dict(
            info,
            num_losses=len(losses),
            num_routes=len(routes),
            predictor_grads=predictor_grads,
            gathered=gathered,
            report=report,
            written=writer.scalars,
            tracker_left=left,
            lbl=lbl,
            n_step_routes=n_routes,
            last_is_none=last is None,
            unconsumed=unconsumed,
            report_r2=report_r2,
        )


def _expected_report(gathered, layer_numbers):
    """Mean over measuring ranks per layer, then over measured layers (the documented rule)."""
    per_layer = {}
    for entry in gathered:
        if entry is None:
            continue
        layer_ids, metrics = entry
        for name, values in metrics.items():
            for layer_id, value in zip(layer_ids, values.tolist()):
                if value == value:  # not NaN
                    per_layer.setdefault((name, layer_numbers[layer_id] - 1), []).append(value)
    expected, layer_means = {}, {}
    for (name, layer), values in per_layer.items():
        mean = sum(values) / len(values)
        expected[f"moe/pr2/{name}_layer_{layer}"] = mean
        layer_means.setdefault(name, []).append(mean)
    for name, means in layer_means.items():
        expected[f"pr2/{name}"] = sum(means) / len(means)
    return expected


def test_pipeline_route_feeding_and_metrics_pp2_dp2():
    results = run_distributed(_rank_pipeline_hooks, 4)
    m = _megatron_lm()
    layer_numbers = m.moe_layer_numbers(4, MOE_LAYER_FREQ)
    by_stage = {0: [], 1: []}
    for r in results:
        by_stage[r["stage"]].append(r)
    assert len(by_stage[0]) == len(by_stage[1]) == 2

    for r in results:
        # Provider: identical stock weights; only predictor parameters are new.
        assert r["same_weights"] and not r["unexpected"]
        assert all("predictor" in k for k in r["missing"])
        assert r["num_losses"] == (NUM_MICROBATCHES if r["stage"] == 1 else 0)
    for r in by_stage[0]:
        assert r["num_pr2_routers"] == 0 and r["num_routes"] == 0 and r["missing"] == []
        assert r["n_step_routes"] == 0 and r["last_is_none"]
    for r in by_stage[1]:
        assert r["num_pr2_routers"] == 2 and r["all_pr2"]
        assert r["num_routes"] == NUM_MICROBATCHES and r["n_step_routes"] == NUM_MICROBATCHES
        # Mini-step 2 with a cache: the predictor got a (nonzero) gradient.
        assert len(r["predictor_grads"]) == 2 and all(g > 0 for g in r["predictor_grads"])
        assert not r["last_is_none"]
        assert "never consumed" in r["unconsumed"]

    gathered = results[0]["gathered"]
    expected = _expected_report(gathered, layer_numbers)
    # The perturbation makes replay differ from the live router, and data differ per DP rank.
    assert 0 < expected["pr2/route_topk_accuracy"] < 1
    measured = [entry for entry in gathered if entry is not None]
    assert len(measured) == 2  # the two DP ranks of the MoE stage; they saw different data
    assert not torch.equal(measured[0][1]["flip_rate"], measured[1][1]["flip_rate"])
    assert set(expected) >= {f"pr2/{n}" for n in m.METRIC_NAMES}
    for r in results:
        # Identical reduced values on every rank, dense stage included.
        assert set(r["report"]) == set(expected), (sorted(r["report"]), sorted(expected))
        for tag, value in expected.items():
            assert abs(r["report"][tag] - value) < 1e-6, (tag, r["report"][tag], value)
        assert r["written"] == {tag: (value, 3) for tag, value in r["report"].items()}
        # PR2 entries are gone from the tracker; Megatron's own entry is untouched.
        assert r["tracker_left"] == ["load_balancing_loss"]
        assert r["lbl"] == [0.0, 0.0, 0.25, 0.0]
        # r2 through pr2_step: route metrics only (no predictor cache in plain record).
        assert set(r["report_r2"]) == {
            "pr2/route_topk_accuracy",
            "pr2/flip_rate",
            "moe/pr2/route_topk_accuracy_layer_2",
            "moe/pr2/route_topk_accuracy_layer_3",
            "moe/pr2/flip_rate_layer_2",
            "moe/pr2/flip_rate_layer_3",
        }
    assert len({tuple(sorted(r["report_r2"].items())) for r in results}) == 1


# ---------------------------------------------------------------------------------------------
# Predictor learning rate through get_megatron_optimizer (both releases)
# ---------------------------------------------------------------------------------------------
def _rank_optimizer():
    import argparse

    _megatron_lm()  # CPU patches before the first megatron-core import of this rank

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    import megatron_pr2.megatron_lm as m
    from megatron_pr2 import PR2Config
    from megatron_pr2.arguments import add_pr2_args, megatron_optimizer_kwargs

    with init_megatron_parallel(seed=3):
        config = make_moe_config(num_layers=2, hidden_size=32, moe_ffn_hidden_size=64)
        model = m.pr2_model_provider(
            lambda pre_process=True, post_process=True, **kw: build_tiny_gpt(
                config, VOCAB, SEQ, pre_process, post_process
            ),
            PR2Config(predictor="bias"),
        )()
        ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
        )
        args = add_pr2_args(argparse.ArgumentParser()).parse_args(["--pr2-alpha", "50"])
        opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.1)
        optimizer = get_megatron_optimizer(
            opt_config, [ddp], **megatron_optimizer_kwargs(args, opt_config)
        )
        OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=1e-3,
            min_lr=1e-4,
            lr_warmup_steps=0,
            lr_decay_steps=10,
            lr_decay_style="constant",
            start_wd=0.1,
            end_wd=0.1,
            wd_incr_steps=10,
            wd_incr_style="constant",
        )
        predictor_ids = {id(p) for n, p in model.named_parameters() if "predictor" in n}
        groups = []
        for group in optimizer.param_groups:
            kinds = {id(p) in predictor_ids for p in group["params"]}
            if group["params"]:
                groups.append((sorted(kinds), group["lr"], group["weight_decay"]))
        return dict(num_predictor=len(predictor_ids), groups=groups)


def test_predictor_learning_rate_in_megatron_optimizer():
    (result,) = run_distributed(_rank_optimizer, 1)
    assert result["num_predictor"] == 2
    predictor_groups = [g for g in result["groups"] if True in g[0]]
    assert predictor_groups == [([True], pytest.approx(50 * 1e-3), 0.0)]
    others = [g for g in result["groups"] if g[0] == [False]]
    assert others and all(lr == pytest.approx(1e-3) for _, lr, _ in others)
    # Megatron's standard overrides are kept: decayed matrices and undecayed 1-D params.
    assert sorted({wd for _, _, wd in others}) == [0.0, pytest.approx(0.1)]


# ---------------------------------------------------------------------------------------------
# Runtime patch of the installed megatron.training (0.19.2 wheel) and the source patch
# ---------------------------------------------------------------------------------------------
MEGATRON_LM_ARGV = [
    "pretrain_gpt.py",
    "--num-layers", "2",
    "--hidden-size", "32",
    "--ffn-hidden-size", "64",
    "--num-attention-heads", "4",
    "--seq-length", str(SEQ),
    "--max-position-embeddings", str(SEQ),
    "--micro-batch-size", str(MBS),
    "--global-batch-size", str(2 * MBS),
    "--lr", "1e-3",
    "--min-lr", "1e-4",
    "--train-iters", "10",
    "--num-experts", "8",
    "--moe-router-topk", "2",
    "--moe-ffn-hidden-size", "64",
    "--moe-token-dispatcher-type", "alltoall",
    "--moe-per-layer-logging",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", str(VOCAB),
    "--mock-data",
    "--transformer-impl", "local",
    "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
    "--position-embedding-type", "learned_absolute",
    "--disable-bias-linear",
    "--pr2-mode", "pr2",
    "--pr2-alpha", "50",
    "--pr2-cache-tokens-per-sequence", "-1",
]  # fmt: skip


class _AnyWriter:
    """TensorBoard stand-in: records add_scalar, accepts any other call."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (float(value), step)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _megatron_training_main():
    """Runs in a fresh process: Megatron-LM's own args, optimizer, schedule and training_log
    with the runtime hooks installed. Prints RESULT<json>."""

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    import megatron_pr2.megatron_lm as m

    m.import_megatron_training()
    import megatron.training.training as training
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import schedules
    from megatron.training import global_vars
    from megatron.training.arguments import parse_and_validate_args

    from megatron_pr2 import PR2Router, pr2_routers
    from megatron_pr2.arguments import add_pr2_args

    sys.argv = list(MEGATRON_LM_ARGV)
    args = parse_and_validate_args(extra_args_provider=add_pr2_args)
    writer = _AnyWriter()
    global_vars._GLOBAL_TENSORBOARD_WRITER = writer
    # Megatron-LM's training_log needs CUDA: wrap a stand-in with its exact signature instead.
    stock = {name: getattr(training, name) for name in m.hooks._HOOKED_NAMES}
    log_calls = []

    def training_log(*a, **k):
        log_calls.append(inspect.signature(stock["training_log"]).bind(*a, **k).arguments)

    training_log.__signature__ = inspect.signature(stock["training_log"])
    training.training_log = training_log
    out = {}
    with init_megatron_parallel(seed=1):
        m.install_megatron_lm_hooks()
        m.install_megatron_lm_hooks()  # idempotent
        # The spec path of pr2_model_provider: TransformerConfig and sizes from Megatron's args.
        provider = m.pr2_model_provider(
            lambda config: get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
        )
        model = provider(pre_process=True, post_process=True)
        routers = pr2_routers(model)
        out["routers"] = [type(r).__name__ for r in routers]
        out["router_alpha"] = [r.pr2_config.alpha for r in routers]
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        opt_config, overrides = training.get_megatron_optimizer_config(args)
        optimizer = training.get_megatron_optimizer(opt_config, [ddp], config_overrides=overrides)
        training.get_optimizer_param_scheduler(optimizer)
        predictor_ids = {id(p) for r in routers for p in r.predictor.parameters()}
        out["groups"] = sorted(
            (any(id(p) in predictor_ids for p in g["params"]), g["lr"], g["weight_decay"])
            for g in optimizer.param_groups
            if g["params"]
        )
        fbf = training.get_forward_backward_func()
        out["wrapped"] = isinstance(fbf, m.PR2ForwardBackward)
        out["inner"] = fbf.forward_backward_func is schedules.forward_backward_no_pipelining
        data = _microbatches(1)[:2]
        kwargs = dict(
            forward_step_func=_forward_step,
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=MBS,
        )
        with m.pr2_step("old_logprob") as step:  # mode from --pr2-mode
            with torch.no_grad():
                fbf(model=[ddp], data_iterator=iter(data), forward_only=True, **kwargs)
        out["recorded"] = len(step.recorded_routes)
        out["step_mode"] = step.handle.mode
        _perturb_routers(model, 3)
        with m.pr2_step("train", routes=step.recorded_routes, ministep=2):
            fbf(model=[ddp], data_iterator=iter(data), forward_only=False, **kwargs)
        out["predictor_grad"] = sum(
            float(p.main_grad.abs().sum()) for r in routers for p in r.predictor.parameters()
        )
        training.training_log({}, {}, 1e-3, 7, 1.0, False, 0, None, None, None, None)
        out["log_calls"] = [c["iteration"] for c in log_calls]
        out["scalars"] = {k: v for k, v in writer.scalars.items() if "pr2" in k}
        m.remove_megatron_lm_hooks()
        out["restored"] = all(
            getattr(training, n) is f for n, f in stock.items() if n != "training_log"
        )
        out["all_pr2"] = all(isinstance(r, PR2Router) for r in routers)
    print("RESULT" + json.dumps(out))


def _run_megatron_training_main():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), REPO])
    code = "import test_megatron_lm as t; t._megatron_training_main()"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run(
        [sys.executable, "-c", code, port], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT") :])


@pytest.mark.skipif(
    not HAS_MEGATRON_TRAINING,
    reason="megatron-core 0.16.1's wheel has no megatron.training (a Megatron-LM checkout has it)",
)
def test_runtime_hooks_on_installed_megatron_training():
    result = _run_megatron_training_main()
    assert result["routers"] == ["PR2Router", "PR2Router"] and result["all_pr2"]
    assert result["router_alpha"] == [50.0, 50.0]  # the provider read --pr2-alpha
    # get_megatron_optimizer (through the hook): predictor at 50 x lr, no weight decay; the
    # standard groups (decayed matrices, undecayed 1-D) unchanged.
    assert result["groups"] == [
        [False, pytest.approx(1e-3), 0.0],
        [False, pytest.approx(1e-3), 0.01],
        [True, pytest.approx(50e-3), 0.0],
    ]
    assert result["wrapped"] and result["inner"]
    assert result["recorded"] == 2 and result["step_mode"] == "predict_record"
    assert result["predictor_grad"] > 0
    # training_log: the hook reported the train step's metrics, then called through.
    assert result["log_calls"] == [7]
    scalars = result["scalars"]
    assert {f"pr2/{name}" for name in ("route_topk_accuracy", "predictor_loss")} <= set(scalars)
    assert "moe/pr2/flip_rate_layer_1" in scalars  # --moe-per-layer-logging
    assert all(step == 7 for _, step in scalars.values())
    assert 0 < scalars["pr2/route_topk_accuracy"][0] < 1
    assert result["restored"]


PATCH = os.path.join(REPO, "patches", "megatron-lm-0.19.2-training-pr2.patch")


@pytest.mark.skipif(not HAS_MEGATRON_TRAINING, reason="needs megatron/training/training.py")
def test_source_patch_applies_and_compiles(tmp_path):
    import py_compile

    spec = importlib.util.find_spec("megatron.training")
    source = os.path.join(os.path.dirname(spec.origin), "training.py")
    target = tmp_path / "megatron" / "training"
    target.mkdir(parents=True)
    shutil.copy(source, target / "training.py")
    with open(PATCH) as f:
        proc = subprocess.run(
            ["patch", "-p1", "--forward"], stdin=f, cwd=tmp_path, capture_output=True, text=True
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    py_compile.compile(str(target / "training.py"), doraise=True)
    patched = (target / "training.py").read_text()
    for call in (
        "config_overrides = pr2_optimizer_overrides_from_args(config, config_overrides)",
        "forward_backward_func = wrap_forward_backward_func(forward_backward_func)",
        "log_pr2_metrics(iteration)",
    ):
        assert call in patched, call
    assert patched.count("wrap_forward_backward_func(forward_backward_func)") == 2
    # The hooks the patch calls exist with the arguments it passes.
    m = _megatron_lm()
    assert list(inspect.signature(m.pr2_optimizer_overrides_from_args).parameters) == [
        "optimizer_config",
        "config_overrides",
    ]
    assert callable(m.wrap_forward_backward_func) and callable(m.log_pr2_metrics)
