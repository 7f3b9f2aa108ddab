# RouteBatch: bit-packing is lossless and compact, bad input fails loudly.
#
# indices [T, L, k] with -1 for missing tokens; dropped [T, L, k] bool.

import math

import pytest
import torch

from megatron_pr2.routes import (
    PredictorCache,
    RouteBatch,
    bits_for,
    narrowest_int_dtype,
    pack_bits,
    unpack_bits,
)

EXPERTS = [2, 3, 8, 64, 128, 256, 1000]
TOPK = [1, 2, 8]


def random_routes(T: int, L: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per (token, layer) when k <= E (as a router produces), else any ids."""
    if k <= E:
        return torch.rand(T, L, E, generator=gen).argsort(dim=-1)[..., :k]
    return torch.randint(0, E, (T, L, k), generator=gen)


@pytest.mark.parametrize("E", EXPERTS)
@pytest.mark.parametrize("k", TOPK)
def test_pack_lossless_with_missing_and_dropped(E: int, k: int) -> None:
    gen = torch.Generator().manual_seed(E * 31 + k)
    T, L = 37, 3  # odd sizes: bit streams do not end on a byte boundary
    indices = random_routes(T, L, k, E, gen)
    if k > E:
        # k distinct experts out of fewer than k cannot exist: a route like that is rejected.
        with pytest.raises(ValueError, match="duplicate expert"):
            RouteBatch(indices, E)
        return
    # extreme ids must survive packing (distinct within each token, as routes are)
    indices[0, 0] = torch.arange(E - k, E)
    indices[1, 0] = torch.arange(k)
    complete = indices.clone()
    missing = torch.rand(T, L, generator=gen) < 0.2
    missing[2, 1] = True
    indices = indices.masked_fill(missing.unsqueeze(-1), -1)
    dropped = (torch.rand(T, L, k, generator=gen) < 0.3) & ~missing.unsqueeze(-1)
    routes = RouteBatch(indices, E, dropped=dropped)

    assert routes.shape == (T, L, k)
    assert torch.equal(routes.indices, indices.to(torch.int64))
    assert torch.equal(routes.missing, missing)
    assert torch.equal(routes.dropped, dropped)
    # no masks present -> None, not an all-False tensor
    clean = RouteBatch(complete, E)
    assert clean.missing is None and clean.dropped is None
    assert torch.equal(clean.indices, complete.to(torch.int64))
    compact = clean.compact_indices
    assert compact.dtype == narrowest_int_dtype(E)
    assert torch.equal(compact.to(torch.int64), complete.to(torch.int64))


@pytest.mark.parametrize("E", EXPERTS)
@pytest.mark.parametrize("k", TOPK)
def test_nbytes_bound(E: int, k: int) -> None:
    gen = torch.Generator().manual_seed(E + k)
    T, L = 64, 4
    indices = random_routes(T, L, k, E, gen)
    if k > E:  # no valid route exists (k distinct experts out of fewer than k)
        with pytest.raises(ValueError, match="duplicate expert"):
            RouteBatch(indices, E)
        return
    routes = RouteBatch(indices, E)
    per_token_layer = k * math.ceil(math.log2(E)) / 8 if E > 1 else k / 8
    assert routes.nbytes <= T * L * per_token_layer + 1
    assert routes.nbytes == math.ceil(T * L * k * bits_for(E) / 8)
    # masks cost one bit per (token, layer) (missing) and per slot (dropped)
    indices[5] = -1
    masked = RouteBatch(indices, E, dropped=torch.zeros(T, L, k, dtype=torch.bool))
    assert (
        masked.nbytes
        <= T * L * per_token_layer + math.ceil(T * L / 8) + math.ceil(T * L * k / 8) + 3
    )
    # the promised compactness: top-8 of 128 experts in 7 bytes per token and layer
    if (E, k) == (128, 8):
        assert routes.nbytes == 7 * T * L


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 10, 13])
def test_pack_bits_roundtrip(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for count in (0, 1, 5, 8, 9, 100):
        values = torch.randint(0, 2**bits, (count,), generator=gen)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(count * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, count), values)


def test_dtypes_accepted() -> None:
    base = torch.tensor([[[3, 1]], [[0, 2]]])
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        routes = RouteBatch(base.to(dtype), 4)
        assert torch.equal(routes.indices, base)


def test_sharded_metadata_and_lookup() -> None:
    indices = torch.arange(12).view(6, 1, 2) % 5
    routes = RouteBatch(
        indices,
        5,
        token_index=torch.tensor([10, 3, 7, 0, 1, 2]),
        layer_index=torch.tensor([4]),
        num_tokens=12,
        seq_length=6,
    )
    assert torch.equal(routes.rows_for(torch.tensor([0, 10, 7])), torch.tensor([3, 0, 2]))
    assert torch.equal(routes.columns_for(torch.tensor([4])), torch.tensor([0]))
    with pytest.raises(ValueError, match="does not hold every token"):
        routes.rows_for(torch.tensor([5]))
    with pytest.raises(ValueError, match="no route for MoE layers"):
        routes.columns_for(torch.tensor([0]))
    canonical = RouteBatch(indices, 5)
    with pytest.raises(ValueError, match="holds tokens 0..5"):
        canonical.rows_for(torch.tensor([6]))
    with pytest.raises(ValueError, match="holds 1 MoE layers"):
        canonical.columns_for(torch.tensor([1]))


def test_cache_select() -> None:
    cache = PredictorCache(torch.tensor([1, 4, 6]), torch.randn(3, 2, 5), torch.randn(3, 2, 8))
    sub = cache.select_tokens(torch.tensor([True, False, True])).select_layers(torch.tensor([1]))
    assert torch.equal(sub.token_index, torch.tensor([1, 6]))
    assert torch.equal(sub.hidden, cache.hidden[[0, 2]][:, [1]])
    assert torch.equal(sub.logits, cache.logits[[0, 2]][:, [1]])


def test_bad_input_errors() -> None:
    good = torch.zeros(4, 2, 2, dtype=torch.int64)
    good[..., 1] = 1
    with pytest.raises(ValueError, match=r"\[tokens, moe_layers, k\]"):
        RouteBatch(torch.zeros(4, 2, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="integer tensor"):
        RouteBatch(good.float(), 8)
    with pytest.raises(ValueError, match="integer tensor"):
        RouteBatch(good.bool(), 8)
    with pytest.raises(ValueError, match="num_experts=0"):
        RouteBatch(good, 0)
    bad = good.clone()
    bad[1, 1, 0] = 8
    with pytest.raises(ValueError, match="expert id 8 out of range for num_experts=8"):
        RouteBatch(bad, 8)
    partial = good.clone()
    partial[2, 0, 0] = -1
    with pytest.raises(ValueError, match="fully missing"):
        RouteBatch(partial, 8)
    with pytest.raises(ValueError, match="dropped shape"):
        RouteBatch(good, 8, dropped=torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_index shape"):
        RouteBatch(good, 8, token_index=torch.arange(3))
    with pytest.raises(ValueError, match="layer_index shape"):
        RouteBatch(good, 8, layer_index=torch.arange(3))
    with pytest.raises(ValueError, match="missing tokens"):
        missing = good.clone()
        missing[0] = -1
        RouteBatch(missing, 8).compact_indices


# -- strict input types (each of these used to pack silently into wrong bits) -----------------
def _good() -> torch.Tensor:
    good = torch.zeros(4, 2, 2, dtype=torch.int64)
    good[..., 1] = 1
    return good


@pytest.mark.parametrize("num_experts", [8.5, 8.0, True, "8", torch.tensor(8)])
def test_num_experts_must_be_an_integer(num_experts) -> None:
    # 8.5 packed ids with ceil(log2 8.5) = 4 bits; int(8.5) = 8 decoded them with 3.
    with pytest.raises(ValueError, match="num_experts=.* must be an integer"):
        RouteBatch(_good(), num_experts)


def test_numpy_integer_num_experts_accepted() -> None:
    np = pytest.importorskip("numpy")
    assert RouteBatch(_good(), np.int64(8)).num_experts == 8


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_dropped_must_be_bool(dtype) -> None:
    # A value 2 at 1 bit per slot would have set the next slot's bit.
    dropped = torch.zeros(4, 2, 2, dtype=dtype)
    dropped[0, 0, 0] = 2
    with pytest.raises(ValueError, match="dropped must be a bool tensor"):
        RouteBatch(_good(), 8, dropped=dropped)
    exact = torch.zeros(4, 2, 2, dtype=torch.bool)
    exact[0, 0, 0] = True
    routes = RouteBatch(_good(), 8, dropped=exact)
    assert torch.equal(routes.dropped, exact)  # only the slot that was set


@pytest.mark.parametrize("bad_id", [-5, -2])
def test_negative_ids_other_than_missing_rejected(bad_id: int) -> None:
    indices = _good()
    indices[1] = bad_id
    with pytest.raises(ValueError, match=f"expert id {bad_id} is negative; only -1"):
        RouteBatch(indices, 8)
    indices[1] = -1  # the documented marker still works
    assert RouteBatch(indices, 8).missing[1].all()


@pytest.mark.parametrize(
    "token_index, match",
    [
        (torch.tensor([0, 1, 1, 3]), "token_index lists id 1 more than once"),
        (torch.tensor([0, 1, 2, 8]), r"token_index holds ids in \[0, 8\]; they must be \[0, 8\)"),
        (torch.tensor([-1, 1, 2, 3]), r"token_index holds ids in \[-1, 3\]"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "token_index must be an integer tensor"),
        (torch.arange(3), r"token_index shape \(3,\) != \(4,\)"),
    ],
)
def test_bad_token_index_rejected(token_index, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RouteBatch(_good(), 8, token_index=token_index, num_tokens=8)


@pytest.mark.parametrize(
    "layer_index, match",
    [
        (torch.tensor([2, 2]), "layer_index lists id 2 more than once"),
        (torch.tensor([-3, 1]), r"layer_index holds ids in \[-3, 1\]; they must be >= 0"),
        (torch.tensor([True, False]), "layer_index must be an integer tensor"),
    ],
)
def test_bad_layer_index_rejected(layer_index, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RouteBatch(_good(), 8, layer_index=layer_index)


def test_token_counts_must_be_consistent() -> None:
    with pytest.raises(ValueError, match="num_tokens=2 must be an integer >= its 4 rows"):
        RouteBatch(_good(), 8, token_index=torch.arange(4), num_tokens=2)
    with pytest.raises(ValueError, match="num_tokens=8 with 4 rows needs a token_index"):
        RouteBatch(_good(), 8, num_tokens=8)
    with pytest.raises(ValueError, match="seq_length=3 must be an integer >= 1 that divides"):
        RouteBatch(_good(), 8, seq_length=3)
    with pytest.raises(ValueError, match="seq_length=2.0 must be an integer"):
        RouteBatch(_good(), 8, seq_length=2.0)


def test_rows_for_out_of_range_is_a_value_error() -> None:
    # It was an IndexError, which the ranks' error agreement did not catch (a peer hung).
    routes = RouteBatch(_good(), 8, token_index=torch.tensor([5, 0, 2, 7]), num_tokens=8)
    assert torch.equal(routes.rows_for(torch.tensor([7, 5])), torch.tensor([3, 0]))
    for asked in ([8], [-1], [0, 100]):
        with pytest.raises(ValueError, match="covers canonical tokens 0..7; asked for"):
            routes.rows_for(torch.tensor(asked))
    with pytest.raises(ValueError, match="does not hold every token"):
        routes.rows_for(torch.tensor([1]))


def test_check_tokens_against_the_input_shape() -> None:
    indices = torch.zeros(16, 1, 2, dtype=torch.int64)
    indices[..., 1] = 1
    routes = RouteBatch(indices, 4, seq_length=8)  # recorded on [S=8, B=2]
    routes.check_tokens(seq_length=8, batch_size=2)
    # Same 16 tokens, other shape: token b * S + s would name another token's route.
    with pytest.raises(ValueError, match=r"recorded for 16 tokens \(seq_length=8\); the input"):
        routes.check_tokens(seq_length=4, batch_size=4)
    with pytest.raises(ValueError, match="seq_length=8 x batch_size=3 = 24 tokens"):
        routes.check_tokens(seq_length=8, batch_size=3)
    # Without a recorded seq_length only the token count can be checked.
    unknown = RouteBatch(indices, 4)
    unknown.check_tokens(seq_length=4, batch_size=4)
    with pytest.raises(ValueError, match="seq_length unknown"):
        unknown.check_tokens(seq_length=5, batch_size=4)


def test_check_layers_against_the_model() -> None:
    indices = torch.zeros(2, 4, 2, dtype=torch.int64)
    indices[..., 1] = 1
    RouteBatch(indices, 4).check_layers(4)
    with pytest.raises(ValueError, match="holds 4 MoE-layer columns; the model has 3"):
        RouteBatch(indices, 4).check_layers(3)
    shard = RouteBatch(indices[:, :2], 4, layer_index=torch.tensor([1, 3]))
    shard.check_layers(4)
    with pytest.raises(ValueError, match=r"layer_index \[1, 3\] names MoE layers .* has 3"):
        shard.check_layers(3)


def test_uint8_routes_of_256_experts_keep_expert_255():
    """Records are kept in the narrowest dtype (uint8 up to 256 experts): expert 255 is an
    expert, not the -1 missing marker."""
    from megatron_pr2 import RouteBatch

    indices = torch.tensor([[[255, 0]], [[3, 255]]], dtype=torch.uint8)
    batch = RouteBatch(indices, 256)
    assert batch.missing is None
    assert torch.equal(batch.indices, indices.long())
    assert torch.equal(batch.decode_indices(torch.uint8), indices)


@pytest.mark.parametrize("E", [4, 16, 128, 256, 1000])
@pytest.mark.parametrize("k", [2, 8, 16])
@pytest.mark.parametrize("missing", [False, True])
def test_layer_major_decode_and_expert_counts(E, k, missing):
    """decode_layer_major (the replay entry's decode: whole int64 groups gathered layer-major
    when 8 | k) equals the token-major decode transposed, for every column / row selection;
    expert_counts are the routed slots per (layer column, expert), missing tokens excluded."""
    if k > E:
        pytest.skip("top-k above the expert count")
    gen = torch.Generator().manual_seed(E * 100 + k)
    T, L = 37, 3
    indices = random_routes(T, L, k, E, gen)
    if missing:
        indices[::3, 1] = -1
    batch = RouteBatch(indices, E)
    dtype = torch.int16 if missing else narrowest_int_dtype(E)
    full = batch.decode_indices(dtype).transpose(0, 1)
    rows = torch.tensor([T - 1, 0, 5])
    for columns, select in ((None, None), ([2, 0], None), (None, rows), ([1], rows)):
        expected = full if columns is None else full[columns]
        expected = expected if select is None else expected[:, select]
        out = batch.decode_layer_major(dtype, columns, select)
        assert out.dtype == dtype and out.is_contiguous() and torch.equal(out, expected)
    for layer in range(L):
        ids = indices[:, layer].reshape(-1)
        counts = torch.bincount(ids[ids >= 0], minlength=E).to(torch.int32)
        assert torch.equal(batch.expert_counts[layer], counts)


def test_pack_microbatches_matches_packing_each():
    """The record pass packs its microbatches at once: the same bytes and expert counts as a
    RouteBatch packing each alone, and tensors of their own (no view of the joint buffer)."""
    from megatron_pr2.records import pack_microbatches

    gen = torch.Generator().manual_seed(3)
    for num_experts, topk, layers in ((8, 2, 1), (128, 8, 3), (300, 4, 2), (2, 1, 1)):
        indices = [
            torch.rand(16, layers, num_experts, generator=gen)
            .topk(topk, dim=-1)[1]
            .to(narrowest_int_dtype(num_experts))
            for _ in range(3)
        ]
        packs = pack_microbatches(indices, num_experts)
        assert packs is not None
        for ids, (packed, counts) in zip(indices, packs):
            alone = RouteBatch(ids, num_experts, trusted=True)
            assert torch.equal(packed, alone._packed) and packed.dtype == alone._packed.dtype
            assert torch.equal(counts, alone.expert_counts) and counts.dtype == torch.int32
            assert packed.untyped_storage().nbytes() == packed.numel()
            batch = RouteBatch(ids, num_experts, trusted=True, packed=(packed, counts))
            assert torch.equal(batch.indices, ids.long())
    odd = [torch.zeros(3, 1, 1, dtype=torch.uint8)] * 2  # 3 ids: not whole groups of 8
    assert pack_microbatches(odd, 8) is None


def test_decode_many_matches_decoding_each():
    """A replay entry decodes its microbatches with one unpack: the same ids, dtype and shape as
    decoding each; None where the joint stream does not apply (missing tokens, other shapes)."""
    from megatron_pr2.residency import decode_many

    gen = torch.Generator().manual_seed(4)
    for num_experts, topk, layers in ((8, 2, 1), (128, 4, 3), (300, 4, 2)):
        batches = [
            RouteBatch(
                torch.rand(16, layers, num_experts, generator=gen).topk(topk, dim=-1)[1],
                num_experts,
            )
            for _ in range(3)
        ]
        dtype = narrowest_int_dtype(num_experts)
        for batch, ids in zip(batches, decode_many(batches)):
            assert torch.equal(ids, batch.decode_indices(dtype)) and ids.dtype == dtype
            assert torch.equal(
                batch.decode_layer_major(dtype, None, None, ids), batch.decode_layer_major(dtype)
            )
    ids = torch.rand(16, 1, 8, generator=gen).topk(2, dim=-1)[1]
    with_missing = ids.clone()
    with_missing[3] = -1  # token 3 has no route
    pair = [RouteBatch(ids, 8), RouteBatch(with_missing, 8)]
    assert decode_many(pair[:1] * 2) is not None and decode_many(pair) is None
