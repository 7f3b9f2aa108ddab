# Shard identity: every route shard records the layout it was cut for, and routing(..., "replay")
# checks it against the rank's own layout from the routers' process groups (no layout= needed).
#
# Single process: identities set by layout_for_rank / shard_routes, check_shard messages naming
# both layouts, and the agreement's verdict on hand-made tables (agreement.verdict is pure).
# 4 gloo ranks, one PR2 MoE layer under TP2 + SP x CP2 (sbhd [16, 2] and packed THD rows of 32
# tokens; MoE-layer level, as tests/test_parallel_replay.py): a shard cut for the CP peer, for
# the SP peer, a hand-made shard of another rank's tokens without identity, and THD shards cut
# for another packing (on one rank; or on every rank against routing(layout=)) raise a
# RouteError on every rank naming both layouts; the right shards (with or without identity,
# recorded on the layout, THD with and without layout=) replay.

import pytest
import torch
from harness import init_megatron_parallel, make_moe_config, run_distributed

from megatron_pr2 import RouteBatch, TokenLayout, shard_routes
from megatron_pr2.agreement import FIELDS, EntryFacts, verdict
from megatron_pr2.identity import LayoutIdentity, ShardIdentity
from megatron_pr2.parallel import check_shard, layout_for_rank

HIDDEN, EXPERTS, TOPK = 32, 8, 2
SEQ, MBS = 16, 2
THD_LEN, PACK_A, PACK_B = 32, [0, 8, 20, 32], [0, 12, 20, 32]


def _routes(tokens, layers=1, seed=0, seq_length=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [torch.randperm(EXPERTS, generator=gen)[:TOPK] for _ in range(tokens * layers)]
    )
    return RouteBatch(ids.view(tokens, layers, TOPK), EXPERTS, seq_length=seq_length)


def test_layouts_and_shards_carry_their_identity():
    layout = layout_for_rank(
        2, 8, tp_rank=1, tp_size=2, sequence_parallel=True, cp_rank=1, cp_size=2
    )
    assert layout.identity == LayoutIdentity(1, 2, True, 1, 2, zigzag=True, packing=None)
    thd = layout_for_rank(1, 32, cp_rank=0, cp_size=2, cu_seqlens=PACK_A)
    other = layout_for_rank(1, 32, cp_rank=0, cp_size=2, cu_seqlens=PACK_B)
    assert thd.identity.packing and thd.identity.packing != other.identity.packing
    shard = shard_routes(_routes(16, 3, seq_length=8), layout, [2, 0])
    assert shard.identity == ShardIdentity(layout.identity, (2, 0))
    assert "TP rank 1/2 SP, CP rank 1/2 zigzag, sbhd, MoE layers [2, 0]" in repr(shard)
    # canonical routes and hand-made layouts have none
    assert _routes(16).identity is None
    assert shard_routes(_routes(16, seq_length=8), TokenLayout.full(8, 2), [0]).identity is None
    with pytest.raises(ValueError, match="identity names MoE layers \\[1\\]"):
        RouteBatch(shard.indices[:, :1], EXPERTS, identity=ShardIdentity(layout.identity, (1,)))


def test_check_shard_names_both_layouts():
    routes = _routes(16, seq_length=8)
    mine = layout_for_rank(2, 8, cp_rank=0, cp_size=2)
    peer = layout_for_rank(2, 8, cp_rank=1, cp_size=2)
    with pytest.raises(ValueError) as error:
        check_shard(shard_routes(routes, peer, [0]), mine, [0])
    message = str(error.value)
    assert "token_index mismatch" in message
    assert "shard cut for TP rank 0/1, CP rank 1/2 zigzag" in message
    assert "this rank: TP rank 0/1, CP rank 0/2 zigzag" in message


def _table(*rows):
    out = []
    for rank, fields in enumerate(rows):
        facts = EntryFacts(rank=rank, microbatches=4, shard_key=0, pp_key=rank % 2)
        for name, value in fields.items():
            setattr(facts, name, value)
        out.append(facts.row())
    return torch.stack(out)


def test_verdict_of_the_gathered_table():
    assert len(FIELDS) == _table({}).shape[1]
    assert verdict(_table({}, {}, {}, {})) is None
    failed = verdict(_table({}, {"error": IndexError("x")}, {"error": ValueError("y")}, {}))
    assert failed == (1, "rank 1 (and 1 more ranks) rejected its routes")
    rank, message = verdict(_table({}, {}, {"microbatches": 3}, {}))
    assert rank == -1 and "rank 2 holds routes for 3 microbatches, rank 0 routes for 4" in message
    # a stage without MoE layers that was given no routes does not count
    assert verdict(_table({}, {"microbatches": -1}, {}, {})) is None
    rank, message = verdict(_table({"pending": 2}, {"pending": 2}, {"pending": 1}, {"pending": 2}))
    assert "rank 2 holds 1 routes left for later calls" in message
    tp = [{"tp_key": 0, "route_digest": 7}, {"tp_key": 0, "route_digest": 7}]
    tp += [{"tp_key": 2, "route_digest": 9}, {"tp_key": 2, "route_digest": 8}]
    assert "tensor-parallel ranks 2 and 3 hold different routes" in verdict(_table(*tp))[1]
    shape = {"shape_digest": 5, "num_tokens": 32, "seq_length": 32, "packing": 0xABC}
    _, message = verdict(_table({}, {}, {}, shape))
    # ranks 0, 1, 2, 3 share shard_key 0; rank 3 differs
    assert "ranks 0 and 3 share microbatches (one TP x CP group)" in message
    assert "THD packing 000000000abc" in message
    # across the pipeline (shard groups differ, pp groups hold ranks 1 and 3)
    rows = [{"shard_key": r // 2} for r in range(4)]
    rows[3] = dict(rows[3], shape_digest=5)
    rows[2] = dict(rows[2], shape_digest=5)
    assert "(one pipeline)" in verdict(_table(*rows))[1]


# ---------------------------------------------------------------------------------------------
# 4 ranks: TP2 + SP x CP2
# ---------------------------------------------------------------------------------------------
def _layer():
    from harness import build_pr2_moe_layer

    from megatron_pr2 import PR2Config

    config = make_moe_config(
        hidden_size=HIDDEN,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=64,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
    )
    return build_pr2_moe_layer(config, PR2Config(telemetry=False))


def _attempt(layer, shard, layout, batch, layout_arg=None):
    """Replay one microbatch: 'ok', or the RouteError text (any other error fails the rank)."""
    from par_util import to_local

    from megatron_pr2 import routing
    from megatron_pr2.agreement import RouteError

    x = torch.randn(layout.num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad(), routing(layer, "replay", routes=shard, layout=layout_arg):
            layer(to_local(x, layout, batch))
    except RouteError as error:
        return f"RouteError: {error}"
    return "ok"


def _rank_identity():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import to_local

    from megatron_pr2 import local_layout, routing

    rank, last = dist.get_rank(), dist.get_world_size() - 1
    out = {}
    with init_megatron_parallel(tp=2, cp=2):
        tp, cp = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
        layer = _layer()
        layout = local_layout(layer, MBS, SEQ)
        out["identity"] = layout.identity.describe()
        routes = _routes(MBS * SEQ, seed=3, seq_length=SEQ)
        mine = shard_routes(routes, layout, [0])
        out["valid"] = _attempt(layer, mine, layout, MBS)

        def peer(**kw):
            sizes = dict(tp_rank=tp, tp_size=2, sequence_parallel=True, cp_rank=cp, cp_size=2)
            return layout_for_rank(MBS, SEQ, **dict(sizes, **kw))

        cases = {
            "cp_peer_shard": shard_routes(routes, peer(cp_rank=1 - cp), [0]),
            "sp_peer_shard": shard_routes(routes, peer(tp_rank=1 - tp), [0]),
        }
        other = peer(cp_rank=1 - cp).token_index
        cases["no_identity_peer_tokens"] = RouteBatch(
            routes.indices[other], EXPERTS, token_index=other, num_tokens=MBS * SEQ, seq_length=SEQ
        )
        for name, shard in cases.items():
            out[name] = _attempt(layer, shard if rank == last else mine, layout, MBS)
        own = layout.token_index
        hand_made = RouteBatch(
            routes.indices[own], EXPERTS, token_index=own, num_tokens=MBS * SEQ, seq_length=SEQ
        )
        out["no_identity_own_tokens"] = _attempt(layer, hand_made, layout, MBS)

        # Shards recorded on this layout carry its identity and replay without layout=.
        x = torch.randn(MBS * SEQ, HIDDEN)
        with torch.no_grad(), routing(layer, "record") as handle:
            layer(to_local(x, layout, MBS))
        recorded = handle.routes
        out["recorded_identity"] = recorded.identity == shard_routes(routes, layout, [0]).identity
        out["recorded_replay"] = _attempt(layer, recorded, layout, MBS)

        # Packed THD: one row of 32 tokens, 3 sequences zigzagged per sequence under CP.
        thd = _routes(THD_LEN, seed=4, seq_length=THD_LEN)
        layout_a = local_layout(layer, 1, THD_LEN, cu_seqlens=PACK_A)
        layout_b = local_layout(layer, 1, THD_LEN, cu_seqlens=PACK_B)
        shard_a, shard_b = shard_routes(thd, layout_a, [0]), shard_routes(thd, layout_b, [0])
        out["thd_valid"] = _attempt(layer, shard_a, layout_a, 1)
        out["thd_valid_layout"] = _attempt(layer, shard_a, layout_a, 1, layout_arg=layout_a)
        out["thd_canonical_layout"] = _attempt(layer, thd, layout_a, 1, layout_arg=layout_a)
        out["thd_other_packing_one_rank"] = _attempt(
            layer, shard_b if rank == last else shard_a, layout_a, 1
        )
        out["thd_other_packing_layout"] = _attempt(layer, shard_b, layout_a, 1, layout_arg=layout_a)
    return out


@pytest.fixture(scope="module")
def identity_runs():
    return run_distributed(_rank_identity, 4)


OK_CASES = [
    "valid",
    "no_identity_own_tokens",
    "recorded_replay",
    "thd_valid",
    "thd_valid_layout",
    "thd_canonical_layout",
]
# case -> (failing rank, phrases of the message)
ERROR_CASES = {
    "cp_peer_shard": ("rank 3", ["another rank's tokens", "cut for TP rank 1/2 SP, CP rank 0/2"]),
    "sp_peer_shard": ("rank 3", ["another rank's tokens", "cut for TP rank 0/2 SP, CP rank 1/2"]),
    "no_identity_peer_tokens": ("rank 3", ["rows are not this rank's tokens", "no identity"]),
    "thd_other_packing_one_rank": ("ranks 0 and 3", ["different microbatch shapes or packings"]),
    "thd_other_packing_layout": ("rank 0", ["another packing", "THD packing"]),
}


def test_right_shards_replay(identity_runs):
    for rank, result in enumerate(identity_runs):
        assert [result[case] for case in OK_CASES] == ["ok"] * len(OK_CASES), (rank, result)
        assert result["recorded_identity"], rank
    # rank r = tp_rank + 2 * cp_rank
    assert identity_runs[3]["identity"].startswith("TP rank 1/2 SP, CP rank 1/2 zigzag, sbhd")


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_wrong_shards_raise_on_every_rank(identity_runs, case):
    who, phrases = ERROR_CASES[case]
    messages = [result[case] for result in identity_runs]
    assert len(set(messages)) == 1, messages
    message = messages[0]
    assert message.startswith("RouteError: routing(replay): ") and who in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    if case != "thd_other_packing_one_rank":
        assert "this rank routes" in message or "this rank:" in message, message
