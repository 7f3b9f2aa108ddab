# routing(..., "replay") entry agreement: any rank's route problem raises the same RouteError on
# every rank of the step, before the step's first collective, with no `group=` (the groups come
# from Megatron's process groups) and for every exception type.
#
# Launch 1 (4 gloo ranks): tiny PR2 GPT (4 layers, the first dense, 8 experts top-2, sequences
# of 16, micro-batch 2, 4 microbatches) under PP2 x TP2 + SP x EP2 (etp 1) with full activation
# recompute, routes replayed through Megatron's 1F1B schedule. Cases, each on the same model:
#   valid                  every rank's own shard (control: no error, finite losses);
#   wrong_layout           the last rank holds the shard cut for its TP peer;
#   wrong_stage            rank 0 holds a shard cut for the other pipeline stage;
#   one_rank_short         the last rank holds routes for 3 of the 4 microbatches;
#   all_short              every rank holds 3 routes for a 4-microbatch schedule call
#                          (forward_backward_with_routes: the count is checked at entry);
#   token_out_of_range     the last rank's routing(layout=) names a token beyond the microbatch;
#   dense_stage            moe_layer_freq [0, 0, 1, 1]: stage 0 has no MoE layer (no PR2 router)
#                          and joins through routing_for_phase; stage 1's last rank is wrong.
# Launch 2 (2 gloo ranks): the same GPT under EP2 across the two data-parallel replicas (tp 1):
#   extra_microbatch / fewer_microbatch (one rank, with and without the dispatch plan), an
#   out-of-range token in routing(layout=), and a shard corrupted after construction (float
#   token ids: an IndexError inside RouteBatch.rows_for, agreed like any other error).
# Hangs: gloo's collective timeout (the harness's, 300 s) would end a rank left waiting; the
# checks below require every rank's own error to be a RouteError naming the failing rank.

import pytest
import torch
from harness import init_megatron_parallel, make_moe_config, run_distributed
from par_util import MOE_LAYER_FREQ, tiny_gpt_config

VOCAB, SEQ, MBS, NUM_MB = 64, 16, 2, 4
NUM_MOE_LAYERS = sum(MOE_LAYER_FREQ)
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)

PP_CASES = [
    "valid",
    "wrong_layout",
    "wrong_stage",
    "one_rank_short",
    "all_short",
    "token_out_of_range",
    "dense_stage",
]
EP_CASES = [
    "valid",
    "extra_microbatch",
    "fewer_microbatch_no_plan",
    "token_out_of_range",
    "corrupted_shard_index",
]


def _canonical(seed, num_layers=NUM_MOE_LAYERS):
    """Valid canonical routes of every microbatch: distinct experts per (token, layer)."""
    from megatron_pr2 import RouteBatch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MB):
        rows = MBS * SEQ * num_layers
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(rows)])
        out.append(RouteBatch(ids.view(MBS * SEQ, num_layers, 2), 8, seq_length=SEQ))
    return out


def _data():
    from par_util import gpt_microbatches

    return gpt_microbatches(NUM_MB, MBS, SEQ, VOCAB, seed=5)


def _outcome(fn):
    """'ok' or the RouteError text; any other exception fails the rank (and the test)."""
    from megatron_pr2.agreement import RouteError

    try:
        fn()
    except RouteError as error:
        return f"RouteError: {error}"
    return "ok"


def _replay(model, routes, *, layout=None, dispatch_plan=None, schedule=False, data=None):
    from par_util import run_schedule

    from megatron_pr2 import routing
    from megatron_pr2.megatron_lm import forward_backward_with_routes

    data = data if data is not None else _data()
    if schedule:  # the documented integration: the schedule's num_microbatches is agreed too
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from par_util import gpt_forward_step

        chunks = model if len(model) > 1 else model[0]
        forward_backward_with_routes(
            get_forward_backward_func(),
            model=chunks,
            phase="train",
            mode="r2",
            routes=routes,
            layout=layout,
            forward_step_func=gpt_forward_step,
            data_iterator=iter(data),
            num_microbatches=len(data),
            seq_length=SEQ,
            micro_batch_size=MBS,
            forward_only=False,
        )
        return
    with routing(model, "replay", routes, layout=layout, dispatch_plan=dispatch_plan):
        losses = run_schedule(model, data, SEQ, MBS, forward_only=False)
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)


def _rank_pp():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import build_pr2_gpt

    from megatron_pr2 import local_layer_ids, local_layout, shard_routes
    from megatron_pr2.parallel import layout_for_rank, moe_layer_ids
    from megatron_pr2.routes import TokenLayout

    rank, last = dist.get_rank(), dist.get_world_size() - 1
    out = {}
    canonical = _canonical(1)
    with init_megatron_parallel(tp=2, pp=2, ep=2, etp=1):
        config = tiny_gpt_config(**RECOMPUTE)
        model = build_pr2_gpt(config, VOCAB, SEQ)
        layout = local_layout(model, MBS, SEQ)
        layers = local_layer_ids(model)
        mine = [shard_routes(c, layout, layers) for c in canonical]
        out["valid"] = _outcome(lambda: _replay(model, mine))

        tp_rank = ps.get_tensor_model_parallel_rank()
        peer = layout_for_rank(MBS, SEQ, tp_rank=1 - tp_rank, tp_size=2, sequence_parallel=True)
        wrong = [shard_routes(c, peer, layers) for c in canonical]
        out["wrong_layout"] = _outcome(lambda: _replay(model, wrong if rank == last else mine))

        other = moe_layer_ids(config, 1 - ps.get_pipeline_model_parallel_rank(), 2)
        stage = [shard_routes(c, layout, other) for c in canonical]
        out["wrong_stage"] = _outcome(lambda: _replay(model, stage if rank == 0 else mine))

        out["one_rank_short"] = _outcome(
            lambda: _replay(model, mine[:-1] if rank == last else mine)
        )
        out["all_short"] = _outcome(lambda: _replay(model, mine[:-1], schedule=True))

        bad = layout.token_index.clone()
        bad[0] = MBS * SEQ + 5
        beyond = TokenLayout(bad, layout.num_tokens, layout.seq_length)
        out["token_out_of_range"] = _outcome(
            lambda: _replay(model, canonical, layout=beyond if rank == last else None)
        )

        # The chained form of the agreement (a stage's group, then the pipeline group), used
        # where the two do not span the world group: every rank gets every row and the message.
        from megatron_pr2.agreement import EntryFacts, agree
        from megatron_pr2.parallel.collectives import gather_rows

        chain = [
            ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
            ps.get_pipeline_model_parallel_group(),
        ]
        out["chained_rows"] = sorted(gather_rows(torch.tensor([rank, 7]), chain)[:, 0].tolist())
        error = ValueError("boom on rank 2") if rank == 2 else None
        facts = EntryFacts(rank=rank, microbatches=4, error=error)
        out["chained_agree"] = _outcome(lambda: agree(facts, chain))

    with init_megatron_parallel(tp=2, pp=2, ep=2, etp=1):
        # Stage 0 holds layers 0 and 1, both dense: its model has no PR2 router.
        config = make_moe_config(
            num_layers=4,
            moe_layer_freq=[0, 0, 1, 1],
            hidden_size=32,
            ffn_hidden_size=64,
            moe_ffn_hidden_size=64,
            num_attention_heads=4,
            pipeline_dtype=torch.float32,
            **RECOMPUTE,
        )
        model = build_pr2_gpt(config, VOCAB, SEQ)
        out["dense_stage_has_routers"] = bool(local_layer_ids(model))
        routes = _canonical(2, num_layers=2)
        if rank == last:
            peer = layout_for_rank(MBS, SEQ, tp_rank=0, tp_size=2, sequence_parallel=True)
            routes = [shard_routes(c, peer, local_layer_ids(model)) for c in routes]
        out["dense_stage"] = _outcome(lambda: _replay(model, routes, schedule=True))
    return out


def _rank_ep():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import build_pr2_gpt

    from megatron_pr2 import local_layer_ids, local_layout, shard_routes
    from megatron_pr2.routes import TokenLayout

    rank = dist.get_rank()
    out = {}
    with init_megatron_parallel(ep=2):
        assert ps.get_data_parallel_world_size() == 2  # EP spans the two DP replicas
        config = tiny_gpt_config()
        model = build_pr2_gpt(config, VOCAB, SEQ)
        layout = local_layout(model, MBS, SEQ)
        canonical = _canonical(10 + rank)  # each DP replica replays its own microbatches
        data = _data()
        out["valid"] = _outcome(lambda: _replay(model, canonical, data=data))

        extra = canonical + canonical[:1] if rank == 1 else canonical
        out["extra_microbatch"] = _outcome(lambda: _replay(model, extra, data=data))
        fewer = canonical[:-1] if rank == 1 else canonical
        out["fewer_microbatch_no_plan"] = _outcome(
            lambda: _replay(model, fewer, dispatch_plan=False, data=data)
        )

        bad = layout.token_index.clone()
        bad[-1] = MBS * SEQ
        beyond = TokenLayout(bad, layout.num_tokens, layout.seq_length)
        out["token_out_of_range"] = _outcome(
            lambda: _replay(model, canonical, layout=beyond if rank == 1 else None, data=data)
        )

        shards = [shard_routes(c, layout, local_layer_ids(model)) for c in canonical]
        if rank == 1:  # corrupted after construction: float token ids, an IndexError in lookup
            shards[2].token_index = shards[2].token_index.float()
        out["corrupted_shard_index"] = _outcome(lambda: _replay(model, shards, data=data))
    return out


@pytest.fixture(scope="module")
def pp_runs():
    return run_distributed(_rank_pp, 4)


@pytest.fixture(scope="module")
def ep_runs():
    return run_distributed(_rank_ep, 2)


# case -> (failing rank named in the message, a phrase of the problem)
EXPECTED_PP = {
    "wrong_layout": ("rank 3", "not this rank's"),
    "wrong_stage": ("rank 0", "has no MoE layers"),
    "one_rank_short": ("rank 3", "routes for 3 microbatches"),
    "all_short": ("rank 0", "num_microbatches=4"),
    "token_out_of_range": ("rank 3", "tokens"),
    "dense_stage": ("rank 3", "not this rank's"),
}
EXPECTED_EP = {
    "extra_microbatch": ("rank 1", "routes for 5 microbatches"),
    "fewer_microbatch_no_plan": ("rank 1", "routes for 3 microbatches"),
    "token_out_of_range": ("rank 1", "tokens"),
    "corrupted_shard_index": ("rank 1", "IndexError"),
}


def _check(results, case, expected):
    messages = [result[case] for result in results]
    who, what = expected[case]
    for rank, message in enumerate(messages):
        assert message.startswith("RouteError: routing(replay): "), (rank, message)
        assert who in message and what in message, (rank, message)
    assert len(set(messages)) == 1, messages  # the same error on every rank


def test_valid_routes_replay_under_pp2_tp2sp_ep2_recompute(pp_runs):
    assert [r["valid"] for r in pp_runs] == ["ok"] * 4


def test_chained_agreement_over_stage_then_pipeline(pp_runs):
    expected = "RouteError: routing(replay): rank 2 rejected its routes: ValueError: boom on rank 2"
    for result in pp_runs:
        assert result["chained_rows"] == [0, 1, 2, 3]
        assert result["chained_agree"] == expected


@pytest.mark.parametrize("case", sorted(EXPECTED_PP))
def test_route_error_on_every_rank_pp2_tp2sp_ep2_recompute(pp_runs, case):
    if case == "dense_stage":
        assert [r["dense_stage_has_routers"] for r in pp_runs] == [False, False, True, True]
    _check(pp_runs, case, EXPECTED_PP)


def test_valid_routes_replay_under_ep2(ep_runs):
    assert [r["valid"] for r in ep_runs] == ["ok"] * 2


@pytest.mark.parametrize("case", sorted(EXPECTED_EP))
def test_route_error_on_every_rank_ep2(ep_runs, case):
    _check(ep_runs, case, EXPECTED_EP)


# ---------------------------------------------------------------------------------------------
# One rank (in process): input checks that complete the agreement's
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg():
    from single_rank import single_rank

    with single_rank() as pg_collection:
        yield pg_collection


def test_single_rank_route_and_argument_checks(pg):
    from harness import build_pr2_moe_layer

    from megatron_pr2 import RouteBatch, routing, shard_routes
    from megatron_pr2.agreement import RouteError
    from megatron_pr2.parallel import layout_for_rank

    config = make_moe_config()  # 2 layers, both MoE
    layer = build_pr2_moe_layer(config, pg_collection=pg)
    x = torch.randn(16, 2, config.hidden_size)  # [S, B, H]
    with torch.no_grad(), routing(layer, "record") as handle:
        layer(x)
    routes = handle.routes
    assert routes.seq_length == 16 and routes.layer_index.tolist() == [0]
    # Routes of [S=16, B=2] on an input of [S=8, B=4]: the same token count, other tokens.
    with pytest.raises(ValueError, match="seq_length=16.*seq_length=8 x batch_size=4"):
        with torch.no_grad(), routing(layer, "replay", routes):
            layer(x.reshape(8, 4, -1))
    # Canonical routes with more MoE-layer columns than the model has.
    extra = RouteBatch(routes.indices.repeat(1, 3, 1), config.num_moe_experts, seq_length=16)
    with pytest.raises(RouteError, match="rank 0 rejected.*3 MoE-layer columns; the model has 2"):
        with routing(layer, "replay", extra):
            pass
    # Any exception type while validating becomes the route error (a corrupted shard).
    shard = shard_routes(routes, layout_for_rank(2, 16), [0])
    shard.token_index = shard.token_index.float()
    with pytest.raises(RouteError, match="IndexError"):
        with routing(layer, "replay", shard):
            pass
