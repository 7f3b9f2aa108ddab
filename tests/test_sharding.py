# Canonical <-> per-rank routes: layouts checked against Megatron-Core's own CP / SP slicing,
# THD zigzag against a chunk-by-chunk reference, MoE layers per pipeline (virtual) stage, pure
# shard -> reassemble identity, and gloo scatter / gather on 4 and 2 ranks (tests/harness.py).
#
# Canonical token of (b, s): b * S + s. Router rows on a rank: [s_local, b] flattened.

import inspect
import random

import pytest
import torch
from harness import run_distributed

from megatron_pr2.parallel import (
    check_shard,
    gather_routes,
    global_moe_layer_id,
    layout_for_rank,
    moe_layer_ids,
    scatter_routes,
    shard_routes,
    thd_partitioned_indices,
)
from megatron_pr2.parallel.codec import (
    decode_shard,
    decode_token_index,
    encode_shard,
    encode_token_index,
)
from megatron_pr2.parallel.exchange import assemble_routes, exchange_routes, merge_routes
from megatron_pr2.parallel.sharding import row_layers
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout


@pytest.fixture(scope="module")
def mcore():
    """Megatron-Core importable on this CPU machine (0.19 needs the triton preload)."""
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()
    import megatron.core.utils as mcore_utils
    from megatron.core.tensor_parallel import mappings

    return mcore_utils, mappings


class FakeGroup:
    """Just enough of a ProcessGroup for Megatron's slicing helpers (size / rank)."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class FakeTex:
    """Transformer Engine's thd_get_partitioned_indices, ported line by line from its CUDA
    kernel (thd_partition_indices_kernel), so Megatron's THD + CP code runs without TE."""

    @staticmethod
    def thd_get_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
        cu = [int(x) for x in cu_seqlens]
        batch = len(cu) - 1
        assert all(c % (world_size * 2) == 0 for c in cu)
        cu_s = [c // world_size for c in cu]
        out = []
        for token_id in range(total_tokens // world_size):
            left, right = 1, batch  # binary_search(token_id, cu_s, batch + 1)
            while left < right:
                mid = (left + right) // 2
                if cu_s[mid] <= token_id:
                    left = mid + 1
                else:
                    right = mid
            seq_id = left - 1
            seq_len = cu_s[seq_id + 1] - cu_s[seq_id]
            index = token_id - cu_s[seq_id]
            offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
            out.append(index + cu_s[seq_id] * world_size + seq_len // 2 * offset)
        return torch.tensor(out, dtype=torch.int64)


def _fake_groups(mcore, monkeypatch):
    mcore_utils, _ = mcore
    monkeypatch.setattr(mcore_utils, "get_pg_size", lambda group=None: group.size())
    monkeypatch.setattr(mcore_utils, "get_pg_rank", lambda group=None: group.rank())
    real_size, real_rank = torch.distributed.get_world_size, torch.distributed.get_rank
    monkeypatch.setattr(
        torch.distributed,
        "get_world_size",
        lambda group=None: group.size() if isinstance(group, FakeGroup) else real_size(group),
    )
    monkeypatch.setattr(
        torch.distributed,
        "get_rank",
        lambda group=None: group.rank() if isinstance(group, FakeGroup) else real_rank(group),
    )
    monkeypatch.setattr(mcore_utils, "tex", FakeTex, raising=False)
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda *args, **kwargs: True)


def _megatron_cp_slice(mcore, batch, cp_rank, cp_size):
    """Megatron's own CP slicing of a batch dict (the signature changed in 0.19)."""
    mcore_utils, _ = mcore
    group = FakeGroup(cp_rank, cp_size)
    if "is_hybrid_cp" in inspect.signature(mcore_utils.get_batch_on_this_cp_rank).parameters:
        return mcore_utils.get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    if batch.get("cu_seqlens") is None:
        return mcore_utils.get_batch_on_this_cp_rank(batch, cp_group=group)
    padded = batch["cu_seqlens_padded"]
    out, _ = mcore_utils.get_thd_batch_on_this_cp_rank(
        {"tokens": batch["tokens"]},
        batch["cu_seqlens"][0],
        (padded if padded is not None else batch["cu_seqlens"])[0],
        torch.tensor([64]),
        cp_size=cp_size,
        cp_rank=cp_rank,
    )
    return out


def megatron_router_tokens(
    mcore, monkeypatch, tokens, tp_rank, tp_size, sp, cp_rank, cp_size, **thd
):
    """Canonical ids of router rows, by pushing a token-id tensor [B, S] through Megatron's own
    code: CP slicing -> embedding transpose [b, s] -> [s, b] -> SP scatter -> flatten."""
    _, mappings = mcore
    _fake_groups(mcore, monkeypatch)
    batch = {"tokens": tokens, **thd}
    if cp_size > 1:
        batch = _megatron_cp_slice(mcore, batch, cp_rank, cp_size)
    hidden = batch["tokens"].transpose(0, 1).contiguous()  # [S/cp, B] like the embedding output
    if sp:
        hidden = mappings._split_along_first_dim(hidden, FakeGroup(tp_rank, tp_size))
    return hidden.reshape(-1)


@pytest.mark.parametrize("B,S", [(1, 24), (3, 24)])
@pytest.mark.parametrize("cp_size", [1, 2, 3])
@pytest.mark.parametrize("tp_size,sp", [(1, False), (2, True), (4, True), (2, False)])
def test_layout_matches_megatron(mcore, monkeypatch, B, S, cp_size, tp_size, sp) -> None:
    seen = []
    for cp_rank in range(cp_size):
        for tp_rank in range(tp_size):
            layout = layout_for_rank(
                B,
                S,
                tp_rank=tp_rank,
                tp_size=tp_size,
                sequence_parallel=sp,
                cp_rank=cp_rank,
                cp_size=cp_size,
            )
            tokens = torch.arange(B).unsqueeze(1) * S + torch.arange(S)  # [B, S] canonical ids
            ref = megatron_router_tokens(
                mcore, monkeypatch, tokens, tp_rank, tp_size, sp, cp_rank, cp_size
            )
            assert torch.equal(layout.token_index, ref), (cp_rank, tp_rank)
            assert layout.num_tokens == B * S and layout.seq_length == S
            seen.append(layout.token_index)
    every = torch.cat(seen)
    if sp or tp_size == 1:
        # SP and CP shards partition the microbatch
        assert torch.equal(torch.sort(every).values, torch.arange(B * S))
    else:
        # TP peers without SP route the same tokens
        assert torch.equal(torch.sort(every).values, torch.arange(B * S).repeat_interleave(tp_size))


def test_layout_explicit_zigzag() -> None:
    # S=8, CP2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    l0 = layout_for_rank(2, 8, cp_rank=0, cp_size=2)
    assert l0.token_index.tolist() == [0, 8, 1, 9, 6, 14, 7, 15]
    l1 = layout_for_rank(2, 8, cp_rank=1, cp_size=2, tp_rank=1, tp_size=2, sequence_parallel=True)
    assert l1.token_index.tolist() == [4, 12, 5, 13]
    full = layout_for_rank(3, 5)
    assert torch.equal(full.token_index, TokenLayout.full(5, 3).token_index)


def thd_reference(bounds, cp_size, cp_rank):
    """Chunk-by-chunk zigzag of every packed sequence (what TE's partitioned indices give)."""
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunks = torch.arange(start, end).chunk(2 * cp_size)
        if end > start:
            out += [chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("padded", [True, False])
def test_thd_layouts(mcore, monkeypatch, cp_size, tp_size, padded) -> None:
    cu_padded = [0, 8, 16, 32, 40]  # each padded length divisible by 2 * cp for cp <= 4
    cu_seqlens = [0, 5, 13, 26, 34] if padded else cu_padded
    total = 40
    seen = []
    for cp_rank in range(cp_size):
        cp_local = (
            thd_reference(cu_padded, cp_size, cp_rank) if cp_size > 1 else torch.arange(total)
        )
        if cp_size > 1:
            assert torch.equal(thd_partitioned_indices(cu_padded, cp_size, cp_rank), cp_local)
            assert torch.equal(
                FakeTex.thd_get_partitioned_indices(cu_padded, total, cp_size, cp_rank), cp_local
            )
        for tp_rank in range(tp_size):
            layout = layout_for_rank(
                1,
                total,
                tp_rank=tp_rank,
                tp_size=tp_size,
                sequence_parallel=True,
                cp_rank=cp_rank,
                cp_size=cp_size,
                cu_seqlens=cu_seqlens,
                cu_seqlens_padded=cu_padded if padded else None,
            )
            n = cp_local.numel() // tp_size
            assert torch.equal(layout.token_index, cp_local[tp_rank * n : (tp_rank + 1) * n])
            # Megatron's own THD path (TE's index function ported) gives the same rows
            ref = megatron_router_tokens(
                mcore,
                monkeypatch,
                torch.arange(total).unsqueeze(0),
                tp_rank,
                tp_size,
                True,
                cp_rank,
                cp_size,
                cu_seqlens=torch.tensor([cu_seqlens]),
                cu_seqlens_padded=torch.tensor([cu_padded]) if padded else None,
            )
            assert torch.equal(layout.token_index, ref)
            seen.append(layout.token_index)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(total))


def test_thd_flattened_microbatch() -> None:
    # B=2 rows of S=8 packed into one row of 16 (megatron-core 0.19 flattening)
    layout = layout_for_rank(2, 8, cp_rank=0, cp_size=2, cu_seqlens=[0, 4, 8, 16])
    assert layout.num_tokens == 16 and layout.seq_length == 8
    assert layout.token_index.tolist() == [0, 3, 4, 7, 8, 9, 14, 15]


def test_thd_unpadded_and_errors() -> None:
    # unpadded THD, lengths divisible by 2 * cp
    layout = layout_for_rank(1, 12, cp_rank=1, cp_size=2, cu_seqlens=[0, 4, 12])
    assert layout.token_index.tolist() == [1, 2, 6, 7, 8, 9]
    # no CP: packed positions in order, trailing padding rows included
    assert layout_for_rank(1, 10, cu_seqlens=[0, 3, 7]).token_index.tolist() == list(range(10))
    with pytest.raises(ValueError, match="divisible by 2 \\* cp_size=4"):
        layout_for_rank(1, 12, cp_rank=0, cp_size=2, cu_seqlens=[0, 5, 12])
    with pytest.raises(ValueError, match="batch_size \\* seq_length=10"):
        layout_for_rank(1, 10, cu_seqlens=[0, 4, 12])
    with pytest.raises(ValueError, match="cover the packed row"):
        layout_for_rank(1, 16, cp_rank=0, cp_size=2, cu_seqlens=[0, 4, 12])
    with pytest.raises(ValueError, match="longer in cu_seqlens"):
        layout_for_rank(1, 12, cu_seqlens=[0, 5, 9], cu_seqlens_padded=[0, 4, 12])
    with pytest.raises(ValueError, match="must start at 0"):
        layout_for_rank(1, 12, cu_seqlens=[1, 4, 12])
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp_size=4"):
        layout_for_rank(1, 10, cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="divisible by tp_size=4"):
        layout_for_rank(1, 6, tp_size=4, tp_rank=0, sequence_parallel=True)
    with pytest.raises(ValueError, match="tp_rank=2"):
        layout_for_rank(1, 8, tp_size=2, tp_rank=2)
    with pytest.raises(ValueError, match="cp_rank=-1"):
        layout_for_rank(1, 8, cp_size=2, cp_rank=-1)


# ---------------------------------------------------------------------------------------------
# MoE layers per pipeline stage
# ---------------------------------------------------------------------------------------------
def make_config(num_layers=8, pp=1, vp=None, **kwargs):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        pipeline_dtype=torch.float32,
        **kwargs,
    )


def stage_table(config, pp, vp=None, **kwargs):
    stages = [(p, v) for v in range(vp or 1) for p in range(pp)]  # model order: vp-major
    return {
        (p, v): moe_layer_ids(config, p, pp, v if vp else None, vp, **kwargs).tolist()
        for p, v in stages
    }


def assert_partition(table, num_moe):
    ordered = [i for ids in table.values() for i in ids]
    assert ordered == list(range(num_moe))


def test_moe_layer_ids_pp2(mcore) -> None:
    config = make_config(pp=2)
    table = stage_table(config, 2)
    assert table == {(0, 0): [0, 1, 2, 3], (1, 0): [4, 5, 6, 7]}
    # dense first layers and every-other-layer MoE
    pattern = [0, 0, 1, 1, 1, 0, 1, 1]
    config = make_config(pp=2, moe_layer_freq=pattern)
    assert stage_table(config, 2) == {(0, 0): [0, 1], (1, 0): [2, 3, 4]}
    config = make_config(pp=2, moe_layer_freq=2)  # layers 0, 2, 4, 6
    assert stage_table(config, 2) == {(0, 0): [0, 1], (1, 0): [2, 3]}


def test_moe_layer_ids_pp2_vpp2(mcore) -> None:
    # Megatron: Stage 0 holds layers [0, 1] [4, 5]; stage 1 [2, 3] [6, 7]
    config = make_config(pp=2, vp=2)
    assert stage_table(config, 2, 2) == {
        (0, 0): [0, 1],
        (1, 0): [2, 3],
        (0, 1): [4, 5],
        (1, 1): [6, 7],
    }
    config = make_config(pp=2, vp=2, moe_layer_freq=[0, 1, 1, 0, 1, 1, 0, 1])
    table = stage_table(config, 2, 2)
    assert table == {(0, 0): [0], (1, 0): [1], (0, 1): [2, 3], (1, 1): [4]}
    assert_partition(table, 5)
    with pytest.raises(ValueError, match="vp_stage=None"):
        moe_layer_ids(config, 0, 2, None, 2)
    with pytest.raises(ValueError, match="pp_rank=2"):
        moe_layer_ids(config, 2, 2, 0, 2)


def test_moe_layer_ids_uneven_and_custom_layout(mcore) -> None:
    config = make_config(num_layers=6, pp=2, num_layers_in_first_pipeline_stage=2)
    assert stage_table(config, 2) == {(0, 0): [0, 1], (1, 0): [2, 3, 4, 5]}
    config = make_config(pp=2, vp=2, pipeline_model_parallel_layout="Et|ttt|tt|ttL")
    table = stage_table(config, 2, 2)
    assert table == {(0, 0): [0], (1, 0): [1, 2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    with pytest.raises(ValueError, match="custom pipeline_model_parallel_layout"):
        moe_layer_ids(config, 0, 4)


def test_moe_layer_ids_other_layout_than_config(mcore) -> None:
    # routes recorded under PP1 can be re-sharded for PP2 x VPP2 with the same config object
    config = make_config(moe_layer_freq=[1, 0, 1, 1, 1, 1, 0, 1])
    assert moe_layer_ids(config, 0, 1).tolist() == list(range(6))
    table = stage_table(config, 2, 2)
    assert table == stage_table(make_config(pp=2, vp=2, moe_layer_freq=config.moe_layer_freq), 2, 2)
    assert_partition(table, 6)
    assert config.pipeline_model_parallel_size == 1  # the caller's config is untouched


def test_global_moe_layer_id_agrees_with_stages(mcore) -> None:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pattern = [0, 1, 1, 0, 1, 1, 1, 1]
    config = make_config(pp=2, vp=2, moe_layer_freq=pattern, mtp_num_layers=1)
    for (p, v), ids in stage_table(config, 2, 2).items():
        offset = get_transformer_layer_offset(config, vp_stage=v, pp_rank=p)
        count = get_num_layers_to_build(config, vp_stage=v, pp_rank=p)
        # layer_number as TransformerLayer computes it: local 1-based + offset
        numbers = [offset + i + 1 for i in range(count) if pattern[offset + i]]
        assert [global_moe_layer_id(config, n) for n in numbers] == ids
    with pytest.raises(ValueError, match="dense layer"):
        global_moe_layer_id(config, 1)
    with pytest.raises(ValueError, match="outside 1..num_layers"):
        global_moe_layer_id(config, 10)
    # MTP layer (layer_number = num_layers + 1) follows the 6 decoder MoE layers
    assert global_moe_layer_id(config, 9) == 6
    assert moe_layer_ids(config, 1, 2, 1, 2, include_mtp=True).tolist() == [4, 5, 6]
    assert moe_layer_ids(config, 0, 2, 1, 2, include_mtp=True).tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------
# Pure slicing: shard -> reassemble identity
# ---------------------------------------------------------------------------------------------
def canonical_routes(B, S, L, k, E, seed, with_cache=True, cache_h=3):
    gen = torch.Generator().manual_seed(seed)
    T = B * S
    indices = torch.rand(T, L, E, generator=gen).argsort(-1)[..., :k]
    missing = torch.rand(T, L, generator=gen) < 0.1
    indices = indices.masked_fill(missing.unsqueeze(-1), -1)
    dropped = (torch.rand(T, L, k, generator=gen) < 0.2) & ~missing.unsqueeze(-1)
    cache = None
    if with_cache:
        tokens = torch.sort(torch.randperm(T, generator=gen)[: max(1, T // 3)]).values
        cache = PredictorCache(
            tokens,
            torch.randn(tokens.numel(), L, cache_h, generator=gen).to(torch.bfloat16),
            torch.randn(tokens.numel(), L, E, generator=gen),
        )
    return RouteBatch(indices, E, dropped=dropped, seq_length=S, cache=cache)


def assert_same_routes(a: RouteBatch, b: RouteBatch) -> None:
    assert a.shape == b.shape and a.num_experts == b.num_experts and a.num_tokens == b.num_tokens
    assert torch.equal(a.indices, b.indices)
    assert (a.dropped is None) == (b.dropped is None)
    if a.dropped is not None:
        assert torch.equal(a.dropped, b.dropped)
    assert (a.cache is None) == (b.cache is None)
    if a.cache is not None:
        for name in ("token_index", "hidden", "logits"):
            assert torch.equal(getattr(a.cache, name), getattr(b.cache, name)), name


def random_rank_grid(rng):
    B = rng.choice([1, 2, 3])
    cp = rng.choice([1, 2])
    tp = rng.choice([1, 2])
    sp = rng.choice([True, False])
    S = 2 * cp * tp * rng.choice([1, 2, 3])
    pp = rng.choice([1, 2])
    L = pp * rng.choice([1, 2])
    return B, S, cp, tp, sp, pp, L


@pytest.mark.parametrize("seed", range(12))
def test_shard_then_reassemble_identity(seed) -> None:
    rng = random.Random(seed)
    B, S, cp, tp, sp, pp, L = random_rank_grid(rng)
    k, E = rng.choice([(1, 4), (2, 8), (8, 128)])
    routes = canonical_routes(B, S, L, k, E, seed)
    full = routes.indices
    shards = []
    for p in range(pp):
        layer_ids = torch.arange(p * L // pp, (p + 1) * L // pp)
        for c in range(cp):
            for t in range(tp):
                layout = layout_for_rank(
                    B, S, tp_rank=t, tp_size=tp, sequence_parallel=sp, cp_rank=c, cp_size=cp
                )
                local = shard_routes(routes, layout, layer_ids)
                check_shard(local, layout, layer_ids)
                # bit-exact slicing in router row order
                assert torch.equal(local.indices, full[layout.token_index][:, layer_ids])
                assert torch.equal(local.dropped, routes.dropped[layout.token_index][:, layer_ids])
                assert set(local.cache.token_index.tolist()) == (
                    set(routes.cache.token_index.tolist()) & set(layout.token_index.tolist())
                )
                # through the wire format, as gather_routes sends it
                payload = encode_shard(
                    local.indices,
                    E,
                    local.dropped,
                    local.cache,
                    local.num_tokens,
                    local.seq_length,
                    token_index=local.token_index,
                    layer_index=local.layer_index,
                )
                shards.append(decode_shard(payload))
    rng.shuffle(shards)
    assert_same_routes(assemble_routes(shards), routes)


def test_shard_of_shard_and_errors() -> None:
    routes = canonical_routes(2, 8, 4, 2, 8, seed=0, with_cache=False)
    layout = layout_for_rank(2, 8, cp_rank=1, cp_size=2)
    stage = shard_routes(routes, TokenLayout.full(8, 2), torch.tensor([2, 3]))
    # a shard can be re-sliced as long as it holds the tokens and layers
    assert torch.equal(
        shard_routes(stage, layout, torch.tensor([3])).indices,
        routes.indices[layout.token_index][:, [3]],
    )
    with pytest.raises(ValueError, match="no route for MoE layers \\[0\\]"):
        shard_routes(stage, layout, torch.tensor([0]))
    with pytest.raises(ValueError, match="num_tokens=24"):
        shard_routes(routes, layout_for_rank(3, 8), torch.tensor([0]))
    local = shard_routes(routes, layout, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="route shard has 8 tokens; this rank's routers route 4"):
        check_shard(
            local,
            layout_for_rank(2, 8, cp_rank=1, cp_size=2, tp_size=2, sequence_parallel=True),
            [1, 2],
        )
    with pytest.raises(
        ValueError, match="route shard has 2 MoE layers; this pipeline stage holds 3"
    ):
        check_shard(local, layout, [1, 2, 3])
    with pytest.raises(ValueError, match="token_index mismatch"):
        check_shard(local, layout_for_rank(2, 8, cp_rank=0, cp_size=2), [1, 2])
    with pytest.raises(ValueError, match="layers \\[1, 2\\] != this stage's MoE layers \\[0, 2\\]"):
        check_shard(local, layout, [0, 2])


def test_token_code_is_compact() -> None:
    for kwargs in (
        dict(
            batch_size=4,
            seq_length=64,
            cp_rank=1,
            cp_size=2,
            tp_rank=1,
            tp_size=2,
            sequence_parallel=True,
        ),
        dict(batch_size=1, seq_length=40, cp_rank=1, cp_size=2, cu_seqlens=[0, 8, 16, 32, 40]),
    ):
        layout = layout_for_rank(**kwargs)
        code = encode_token_index(layout.token_index, layout.num_tokens, layout.seq_length)
        assert code.numel() <= 4 + 2 * 8
        assert torch.equal(decode_token_index(code), layout.token_index)
    arbitrary = torch.tensor([5, 3, 9, 0])
    code = encode_token_index(arbitrary, 12, 6)
    assert torch.equal(decode_token_index(code), arbitrary)


def test_assemble_detects_disagreement_and_gaps() -> None:
    routes = canonical_routes(1, 8, 2, 2, 8, seed=3, with_cache=False)
    layout = TokenLayout.full(8, 1)
    a = shard_routes(routes, layout, torch.tensor([0, 1]))

    def decoded(r):
        return decode_shard(
            encode_shard(
                r.indices,
                8,
                r.dropped,
                r.cache,
                r.num_tokens,
                r.seq_length,
                r.token_index,
                r.layer_index,
            )
        )

    other = a.indices.clone()
    row = int(torch.nonzero(other[:, 1, 0] >= 0)[0])
    other[row, 1] = (other[row, 1] + 1) % 8
    b = RouteBatch(
        other,
        8,
        dropped=a.dropped,
        token_index=a.token_index,
        layer_index=a.layer_index,
        num_tokens=8,
    )
    with pytest.raises(
        ValueError, match="rank 1 disagrees with an earlier rank on 1 \\(token, layer\\)"
    ):
        assemble_routes([decoded(a), decoded(b)])
    half = shard_routes(
        routes, layout_for_rank(1, 8, tp_size=2, tp_rank=0, sequence_parallel=True), [0, 1]
    )
    with pytest.raises(ValueError, match="8 \\(token, layer\\) routes were sent by no rank"):
        assemble_routes([decoded(half)])


# ---------------------------------------------------------------------------------------------
# Multi-rank scatter / gather over gloo
# ---------------------------------------------------------------------------------------------
def _count_recv_bytes(counter):
    """Count the bytes this rank receives through all_to_all_single (exchange.py's only
    transfer): the per-peer sizes and the payloads."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def all_to_all_single(output, *args, **kwargs):
        counter[0] += output.numel() * output.element_size()
        return original(output, *args, **kwargs)

    dist.all_to_all_single = all_to_all_single
    return original


def _rank_scatter_gather_4():
    """4 ranks: (a) CP2 x TP2 with SP over the world; (b) PP2 x TP2 without SP; (c) a subgroup
    with src = group rank 0 (global 1); (d) a bad request and a TP disagreement fail loudly."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    B, S, L, k, E = 2, 16, 4, 8, 128
    routes = canonical_routes(B, S, L, k, E, seed=11)

    # (a) CP2 x TP2, SP: disjoint token shards, all layers
    layout = layout_for_rank(
        B, S, cp_rank=rank // 2, cp_size=2, tp_rank=rank % 2, tp_size=2, sequence_parallel=True
    )
    layers = torch.arange(L)
    counter = [0]
    world = dist.group.WORLD
    original = _count_recv_bytes(counter)
    try:
        local = scatter_routes(routes if rank == 0 else None, layout, layers, world)
    finally:
        dist.all_to_all_single = original
    ref = shard_routes(routes, layout, layers)
    assert_same_routes(local, ref)
    out["recv_bytes"] = counter[0]
    # Two exchanges, each 8 bytes of size per peer; then this rank's packed slice: 128-byte
    # header + packed routes + its cache rows (the documented cost).
    out["expected_bytes"] = 2 * 8 * 4 + 128 + ref.nbytes + ref.cache.nbytes
    out["route_bytes"] = ref.nbytes
    if rank == 0:
        # the source also receives every request: [4 header ints, run-length code, layer ids]
        for peer in range(4):
            peer_layout = layout_for_rank(
                B,
                S,
                cp_rank=peer // 2,
                cp_size=2,
                tp_rank=peer % 2,
                tp_size=2,
                sequence_parallel=True,
            )
            code = encode_token_index(peer_layout.token_index, B * S, S)
            assert code.numel() == 6  # one run of positions
            out["expected_bytes"] += 8 * (4 + code.numel() + L)
    gathered = gather_routes(local, world)
    if rank == 0:
        assert_same_routes(gathered, routes)
    else:
        assert gathered is None

    # (b) PP2 x TP2 without SP: TP peers duplicate tokens, PP stages split layers
    pp_rank, tp_rank = rank // 2, rank % 2
    layout = layout_for_rank(B, S, tp_rank=tp_rank, tp_size=2)
    layers = torch.arange(pp_rank * 2, pp_rank * 2 + 2)
    local = scatter_routes(routes if rank == 0 else None, layout, layers, world)
    assert_same_routes(local, shard_routes(routes, layout, layers))
    gathered = gather_routes(local, world, dst=3)
    if rank == 3:
        assert_same_routes(gathered, routes)

    # (c) subgroup of global ranks [1, 2, 3]; its rank 0 (global 1) is the source
    sub = dist.new_group([1, 2, 3])
    if rank != 0:
        g = dist.get_rank(sub)
        # group ranks 0 and 1 hold the two CP halves, group rank 2 the whole microbatch
        layout = layout_for_rank(B, S, cp_rank=g, cp_size=2) if g < 2 else layout_for_rank(B, S)
        local = scatter_routes(routes if rank == 1 else None, layout, [1, 3], group=sub)
        assert_same_routes(local, shard_routes(routes, layout, torch.tensor([1, 3])))
        gathered = gather_routes(local, group=sub, dst=2)
        if g == 2:
            assert gathered.layer_index.tolist() == [1, 3]  # not every layer: kept explicit
            assert torch.equal(gathered.indices, routes.indices[:, [1, 3]])
        out["sub_gather_none"] = gathered is None

    # (d1) rank 2 asks for a layer the source does not have: both src and rank 2 raise
    layers = torch.tensor([7]) if rank == 2 else torch.tensor([0])
    try:
        scatter_routes(routes if rank == 0 else None, layout_for_rank(B, S), layers, world)
        out["bad_request"] = None
    except ValueError as exc:
        out["bad_request"] = str(exc)
    # (d2) TP peers without SP disagree: dst raises, naming the problem
    local = shard_routes(routes, layout_for_rank(B, S), torch.arange(L))
    if rank == 1:
        bad = local.indices.clone()
        bad[3, 0] = torch.arange(k) + 100
        local = RouteBatch(
            bad,
            E,
            dropped=local.dropped,
            token_index=local.token_index,
            layer_index=local.layer_index,
            num_tokens=local.num_tokens,
            cache=local.cache,
        )
    try:
        gather_routes(local, world)
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    dist.barrier()
    return out


def test_scatter_gather_4_ranks() -> None:
    results = run_distributed(_rank_scatter_gather_4, 4)
    total = canonical_routes(2, 16, 4, 8, 128, seed=11).nbytes
    for rank, out in enumerate(results):
        # each rank receives exactly its packed slice (+ sizes; the source also the requests)
        assert out["recv_bytes"] == out["expected_bytes"], rank
        # a quarter of the tokens: packed routes + masks, a 128-byte header, cached rows
        assert out["route_bytes"] <= total / 4 + 2
    assert results[1]["sub_gather_none"] and results[2]["sub_gather_none"]
    assert not results[3]["sub_gather_none"]
    assert (
        "rank 2" in results[0]["bad_request"] and "asked for layer 7" in results[0]["bad_request"]
    )
    assert "could not serve rank 2" in results[2]["bad_request"]
    # scatter_routes agrees on failure: ranks whose own request was fine stop too (no hang).
    for rank in (1, 3):
        assert (
            "another rank of the group could not get its route shard"
            in results[rank]["bad_request"]
        )
    assert "rank 1 disagrees" in results[0]["mismatch"]
    assert all(results[r]["mismatch"] is None for r in (1, 2, 3))


def _sequence_piece(routes: RouteBatch, b: int, S: int, slot: int, B: int) -> RouteBatch:
    """Sequence b of `routes` (canonical, B sequences of S tokens) as the piece that fills
    sequence slot `slot` of another microbatch of B sequences (token ids relabelled)."""
    rows = torch.arange(b * S, (b + 1) * S)
    piece = shard_routes(routes, TokenLayout(rows, B * S, S), row_layers(routes))
    shift = (slot - b) * S
    cache = piece.cache
    if cache is not None:
        cache = PredictorCache(cache.token_index + shift, cache.hidden, cache.logits)
    return RouteBatch(
        piece.indices,
        piece.num_experts,
        dropped=piece.dropped,
        token_index=rows + shift,
        layer_index=piece.layer_index,
        num_tokens=B * S,
        seq_length=S,
        cache=cache,
    )


def _rank_remicrobatch_4():
    """4 ranks as a data-parallel group of one pipeline stage (MoE layers 2, 3): each recorded
    two microbatches of 2 sequences; training regroups the 16 sequences so that every new
    microbatch takes its sequences from two other ranks. exchange_routes moves only the pieces."""
    import torch.distributed as dist

    rank = dist.get_rank()
    B, S, L, k, E = 2, 8, 2, 4, 16
    layers = torch.tensor([2, 3])

    def recorded(r, m):  # every rank can rebuild every rank's recorded shard (seeded)
        canonical = canonical_routes(B, S, L, k, E, seed=100 + 10 * r + m)
        return RouteBatch(
            canonical.indices,
            E,
            dropped=canonical.dropped,
            layer_index=layers,
            num_tokens=B * S,
            seq_length=S,
            cache=canonical.cache,
        )

    # New microbatch (r, j), slot b <- sequence (source rank, microbatch, sequence), the same
    # plan on every rank: a permutation of the 16 sequences, slot 0 from rank r + 1 and slot 1
    # from rank r + 2.
    plan = {}
    for d in range(16):
        g = (d + (8 if d % 2 else 4)) % 16
        plan[(d // 4, d // 2 % 2, d % 2)] = (g // 4, g // 2 % 2, g % 2)
    outgoing = {}
    for (r, j, b), (src, m, seq) in sorted(plan.items()):
        if src == rank:
            outgoing.setdefault(r, []).append(_sequence_piece(recorded(src, m), seq, S, b, B))
    received = exchange_routes(outgoing, dist.group.WORLD)
    # The pieces of this rank, in the senders' (sorted-plan) order.
    expected_order = {}
    for (r, j, b), (src, _, _) in sorted(plan.items()):
        if r == rank:
            expected_order.setdefault(src, []).append((j, b))
    out = dict(pieces=sum(len(p) for p in received.values()), ok=[])
    by_microbatch = {0: [], 1: []}
    for src, pieces in received.items():
        assert [p.layer_index.tolist() for p in pieces] == [[2, 3]] * len(pieces)
        assert all(p.shape[0] == S for p in pieces)  # one sequence each, never a microbatch
        for (j, _), piece in zip(expected_order[src], pieces):
            by_microbatch[j].append(piece)
    for j in range(2):
        merged = merge_routes(by_microbatch[j])
        # Reference: the planned sequences cut from the rebuilt recorded shards.
        pieces = [
            _sequence_piece(recorded(src, m), seq, S, b, B)
            for b in range(B)
            for (src, m, seq) in [plan[(rank, j, b)]]
        ]
        assert_same_routes(merged, merge_routes(pieces))
        direct = torch.cat(
            [
                recorded(src, m).indices[seq * S : (seq + 1) * S]
                for b in range(B)
                for (src, m, seq) in [plan[(rank, j, b)]]
            ]
        )
        out["ok"].append(torch.equal(merged.indices, direct))
    return out


def test_exchange_routes_regroups_sequences_across_data_parallel_ranks() -> None:
    results = run_distributed(_rank_remicrobatch_4, 4, timeout=240)
    for rank, out in enumerate(results):
        assert out["pieces"] == 4, rank  # 2 microbatches x 2 sequences, nothing else
        assert out["ok"] == [True, True], rank


def test_exchange_functions_need_an_explicit_group() -> None:
    routes = canonical_routes(1, 4, 1, 2, 8, seed=1)
    layout = layout_for_rank(1, 4)
    with pytest.raises(ValueError, match="scatter_routes: group=None must be a torch"):
        scatter_routes(routes, layout, [0], None)
    with pytest.raises(ValueError, match="gather_routes: group=None"):
        gather_routes(routes, None)
    with pytest.raises(ValueError, match="exchange_routes: group=None"):
        exchange_routes({}, None)


def _rank_thd_cp2():
    """2 ranks, packed THD with padding under CP2: scatter, replay rows, gather."""
    import torch.distributed as dist

    rank = dist.get_rank()
    cu, cu_padded, total = [0, 3, 10, 11], [0, 4, 12, 16], 16
    routes = canonical_routes(1, total, 3, 2, 16, seed=5)
    layout = layout_for_rank(
        1, total, cp_rank=rank, cp_size=2, cu_seqlens=cu, cu_seqlens_padded=cu_padded
    )
    world = dist.group.WORLD
    local = scatter_routes(routes if rank == 0 else None, layout, [0, 1, 2], world)
    assert_same_routes(local, shard_routes(routes, layout, [0, 1, 2]))
    gathered = gather_routes(local, world, dst=1)
    if rank == 1:
        assert_same_routes(gathered, routes)
    return layout.token_index.tolist()


def test_thd_cp2_two_ranks() -> None:
    tokens = run_distributed(_rank_thd_cp2, 2)
    assert tokens == [[0, 3, 4, 5, 10, 11, 12, 15], [1, 2, 6, 7, 8, 9, 13, 14]]


@pytest.mark.parametrize("thd", [False, True])
def test_engine_routes_same_expert_under_every_layout(thd) -> None:
    """R3: routes imported from an engine reach every router row of every layout unchanged."""
    import numpy as np

    from megatron_pr2.engines import routes_from_engine

    B, S, L, k, E = 2, 16, 2, 2, 8
    rng = np.random.default_rng(0)
    lengths = [15, 9]
    arrays = [np.argsort(rng.random((n, L, E)), -1)[..., :k].astype(np.int32) for n in lengths]
    if thd:
        cu = [0, 16, 32]  # one sequence per row, packed into one stream (0.19 flattening)
        routes = routes_from_engine(arrays, E, S, cu_seqlens=cu, packed_rows=B)
    else:
        cu = None
        routes = routes_from_engine(arrays, E, S)

    def expert(token):
        b, s = divmod(int(token), S)
        return arrays[b][s] if s < lengths[b] else None

    for cp, tp in ((1, 1), (2, 1), (2, 2), (4, 2)):
        for c in range(cp):
            for t in range(tp):
                layout = layout_for_rank(
                    B,
                    S,
                    cp_rank=c,
                    cp_size=cp,
                    tp_rank=t,
                    tp_size=tp,
                    sequence_parallel=True,
                    cu_seqlens=cu,
                )
                local = shard_routes(routes, layout, [1])
                for row, token in enumerate(layout.token_index.tolist()):
                    want = expert(token)
                    got = local.indices[row, 0]
                    if want is None:
                        assert bool((got == -1).all())
                    else:
                        assert got.tolist() == want[1].tolist()
