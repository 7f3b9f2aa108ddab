# The README's sharded-replay example, run as written on 4 gloo ranks: TP2 + SP x PP2 x EP2
# (ETP1), a tiny PR2 GPTModel (4 layers, the first dense), 4 microbatches of [2 x 16] tokens,
# Megatron's 1F1B schedule.
#
# The block between `<!-- sharded-replay-example -->` and the end of its code fence is executed
# with the names it uses bound by the test: `forward_backward(forward_only)` is Megatron's
# get_forward_backward_func() over the rank's microbatches, and `optimizer.step()` drifts every
# router weight (a simulated policy update, so a replay that re-routed would pick other experts).
# Checked: every rank received only its tokens (SP shard) and its stage's MoE layers, and in
# every mini-step every router call of every rank routed each token to exactly the experts of the
# canonical route gathered from the record (per (token, layer)).

import os
import re

import torch
from harness import init_megatron_parallel, run_distributed
from par_util import MOE_LAYER_FREQ, tiny_gpt_config

VOCAB, SEQ, MBS, NUM_MB, MINISTEPS = 64, 16, 2, 4, 2
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example() -> str:
    """The sharded-replay code block of README.md."""
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- sharded-replay-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- sharded-replay-example --> python block"
    return match.group(1)


def _rank_example(code: str):
    import torch.distributed as dist
    from par_util import (
        build_pr2_gpt,
        capture_routes,
        check_capture,
        drift_routers,
        gpt_microbatches,
        run_schedule,
        wrap_ddp,
    )

    from megatron_pr2.parallel.layout import layout_for_rank

    with init_megatron_parallel(tp=2, pp=2, ep=2, etp=1):
        from megatron.core import parallel_state as ps

        config = tiny_gpt_config()
        torch.manual_seed(7)  # every rank builds the same weights; TP / EP slices differ
        model = wrap_ddp(config, build_pr2_gpt(config, VOCAB, SEQ))
        data = gpt_microbatches(NUM_MB, MBS, SEQ, VOCAB, seed=3)

        class DriftingOptimizer:
            def step(self) -> None:
                drift_routers(model, seed=11)

        captures = []

        def forward_backward(forward_only: bool) -> None:
            if forward_only:
                run_schedule(model, data, SEQ, MBS, forward_only=True)
                return
            with capture_routes(model) as capture:
                run_schedule(model, data, SEQ, MBS, forward_only=False)
            captures.append(capture)

        scope = dict(
            torch=torch,
            model=model,
            forward_backward=forward_backward,
            micro_batch_size=MBS,
            seq_length=SEQ,
            num_ministeps=MINISTEPS,
            optimizer=DriftingOptimizer(),
        )
        exec(compile(code, "README.md:sharded-replay-example", "exec"), scope)

        # The canonical routes exist on dst 0 of the model-parallel group: share them.
        group = ps.get_model_parallel_group()
        canonical = [None] * dist.get_world_size(group)
        dist.all_gather_object(canonical, scope["canonical"], group=group)
        canonical = canonical[0]
        expected = layout_for_rank(
            MBS, SEQ, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=2, sequence_parallel=True
        )
        mismatched = calls = 0
        for capture in captures:
            check = check_capture(capture, [expected] * NUM_MB, canonical)
            mismatched += check["mismatched_rows"]
            calls += check["calls"]
        return dict(
            shard_shapes=[tuple(s.shape) for s in scope["shards"]],
            layer_ids=scope["shards"][0].layer_index.tolist(),
            tokens=scope["layout"].token_index.tolist(),
            expected_tokens=expected.token_index.tolist(),
            canonical_shape=tuple(canonical[0].shape),
            calls=calls,
            mismatched=mismatched,
            pp_rank=ps.get_pipeline_model_parallel_rank(),
        )


def test_readme_sharded_replay_example_runs_as_written() -> None:
    results = run_distributed(_rank_example, 4, readme_example(), timeout=900)
    num_moe = sum(MOE_LAYER_FREQ)
    for rank, r in enumerate(results):
        assert r["canonical_shape"] == (MBS * SEQ, num_moe, 2), (rank, r)
        # SP shard: half of the 32 tokens; a stage's MoE layers only.
        assert r["tokens"] == r["expected_tokens"], (rank, r)
        assert all(shape[0] == MBS * SEQ // 2 for shape in r["shard_shapes"]), (rank, r)
        assert 0 < len(r["layer_ids"]) < num_moe, (rank, r)
        # Every router call of both mini-steps replayed the canonical experts.
        assert r["calls"] == MINISTEPS * NUM_MB * len(r["layer_ids"]), (rank, r)
        assert r["mismatched"] == 0, (rank, r)
    stages = {r["pp_rank"]: r["layer_ids"] for r in results}
    assert sorted(sum(stages.values(), [])) == list(range(num_moe))
