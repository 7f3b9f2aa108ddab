# Router drift in the RL loop: the route probe's same-token metrics, the predictor frozen on
# mini-steps without a predictor loss, and the offline predictor lab reproducing a real run
# (micro model, 1 process, seconds).

import math

import pytest
import torch

from megatron_pr2 import PR2Config
from megatron_pr2.rl.task import ArithmeticTask, TaskConfig
from megatron_pr2.rl.tokenizer import TaskTokenizer, train_tokenizer

MICRO_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, moe_ffn_hidden_size=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from single_rank import single_rank

    root = tmp_path_factory.mktemp("drift")
    task = ArithmeticTask(TaskConfig(num_digits=2))
    train_tokenizer(task.corpus(seed=0, n=3000), str(root / "tok"), 64)
    tokenizer = TaskTokenizer(str(root / "tok.model"))
    with single_rank():
        from megatron_pr2.rl.model import ModelConfig, build_gpt_model, full_state_dict
        from megatron_pr2.rl.sft import SFTConfig, run_sft

        model_cfg = ModelConfig(**MICRO_MODEL)
        model = build_gpt_model(model_cfg, tokenizer.padded_vocab_size(), PR2Config(), seed=1)
        run_sft(model, task, tokenizer, SFTConfig(steps=15, batch_size=32, lr=3e-3), 11)
        yield dict(
            task=task, tokenizer=tokenizer, model_cfg=model_cfg, state=full_state_dict(model)
        )


def _trainer(setup, run_dir, mode, **overrides):
    from megatron_pr2.rl.loop import RLConfig, RLTrainer

    cfg = dict(mode=mode, seed=3, steps=2, prompts_per_step=4, group_size=4, num_ministeps=2)
    cfg.update(lr=1e-3, pr2=PR2Config(alpha=10.0, cache_tokens_per_sequence=64))
    cfg.update(overrides)
    return RLTrainer(
        RLConfig(**cfg),
        setup["model_cfg"],
        setup["task"],
        setup["tokenizer"],
        str(run_dir),
        init_state=setup["state"],
    )


def test_probe_measures_the_same_tokens_in_every_mode(setup, tmp_path):
    rows = {}
    for mode in ("none", "r2"):
        rows[mode] = _trainer(setup, tmp_path / mode, mode).train(progress=False)
    for mode, history in rows.items():
        for row in history:
            # Mini-step 1 runs the old-pass weights: the live top-k is the recorded one.
            assert row["drift/stale_topk_accuracy/ministep_1"] == 1.0
            change = row["drift/expert_change_per_update/mean"]
            assert 0.0 <= change < 0.5 and math.isfinite(change)
            assert change == pytest.approx(1 - row["drift/stale_topk_accuracy/ministep_2"])
    # Same seed, same first rollout: the first mini-step-2 drift is the same in both modes.
    first = [rows[m][0]["drift/stale_topk_accuracy/ministep_2"] for m in ("none", "r2")]
    assert first[0] == first[1]
    # R2 replays TopK(p_old): its replayed accuracy is the stale one; no replay has none.
    for row in rows["r2"]:
        for i in (1, 2):
            assert row[f"drift/replayed_topk_accuracy/ministep_{i}"] == pytest.approx(
                row[f"drift/stale_topk_accuracy/ministep_{i}"], abs=1e-12
            )
    assert not any("drift/replayed_topk_accuracy/mean" in row for row in rows["none"])


def test_predictor_does_not_move_at_ministep_1(setup, tmp_path):
    """W_p is bit-unchanged by every mini-step-1 optimizer step, also after mini-step 2 gave
    AdamW nonzero moments; it moves at mini-step 2."""
    trainer = _trainer(setup, tmp_path, "pr2", steps=3)
    params = [p for n, p in trainer.model.named_parameters() if ".predictor." in n]
    step, moved = trainer.optimizer.step, []

    def watched_step(*args, **kwargs):
        before = [p.detach().clone() for p in params]
        out = step(*args, **kwargs)
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, params)))
        return out

    trainer.optimizer.step = watched_step
    trainer.train(progress=False)
    assert moved == [False, True] * 3


@pytest.mark.parametrize("update, decay", [("adam", 0.0), ("sgd", 30.0)])
def test_lab_reproduces_the_run_it_dumped(setup, tmp_path, update, decay):
    """The lab trains the run's own predictor on the dumped tokens (all of them): its W_p at
    every old pass and its predicted-route accuracy match the run's, with the paper's AdamW
    update and with the gradient-descent update under predictor weight decay."""
    from benchmarks.predictor_lab import build_variant, load_dump, simulate, summarize

    pr2 = PR2Config(
        alpha=10.0,
        cache_tokens_per_sequence=64,
        predictor_update=update,
        predictor_weight_decay=decay,
    )
    trainer = _trainer(setup, tmp_path, "pr2", steps=4, lab_dump_fraction=1.0, pr2=pr2)
    history = trainer.train(progress=False)
    records = load_dump(str(tmp_path))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    meta = records[0]["meta"]
    assert meta["predictor_lr"] == pytest.approx(1e-2) and meta["loss"] == "kl-post"
    assert meta["predictor_weight_decay"] == decay and meta["predictor_update"] == update
    shape = records[0]["h_old"].shape[1:] + records[0]["p_old"].shape[-1:]
    variant = build_variant("run", meta, shape)
    seen = []
    original_begin = variant.begin

    def begin(record):
        original_begin(record)
        seen.append(variant.weight().clone())

    variant.begin = begin
    rows = simulate(records, variant)
    for record, lab_weight in zip(records, seen):
        run_weight = torch.stack([p["weight"] for p in record["predictor_old"]])
        scale = float(run_weight.abs().max()) or 1.0
        assert float((lab_weight - run_weight).abs().max()) <= 1e-3 * scale + 1e-9
    lab = summarize(rows, window=1.0)
    run = [h["drift/replayed_topk_accuracy/ministep_ge2"] for h in history]
    assert lab["pred_ge2"] == pytest.approx(sum(run) / len(run), abs=0.02)
    # The zero-offset variant is R2 on the same tokens.
    r2 = summarize(simulate(records, build_variant("r2", meta, shape)), window=1.0)
    assert r2["pred_ge2"] == r2["r2_ge2"] == lab["r2_ge2"]
