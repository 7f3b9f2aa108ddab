# Inference-engine route import/export: lossless round trips for every wire dtype and base64,
# canonical placement (batch-major, unrouted rows missing), and loud validation.
#
# Engine arrays: [n_b, L, k] per sequence (n_b = tokens_b - 1 usually).

import base64

import numpy as np
import pytest
import torch

from megatron_pr2.engines import routes_from_engine, routes_to_engine
from megatron_pr2.routes import RouteBatch


def engine_routes(lengths, L, k, E, seed, np_dtype=np.int32):
    """Per-sequence engine arrays with distinct experts per (token, layer)."""
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((n, L, E)), axis=-1)[..., :k].astype(np_dtype) for n in lengths]


@pytest.mark.parametrize(
    "np_dtype,E",
    [(np.int32, 1000), (np.int32, 8), (np.uint16, 1000), (np.uint8, 64), (np.uint8, 256)],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_roundtrip_arrays(np_dtype, E, as_tensor) -> None:
    S, L, k = 9, 3, 2
    lengths = [8, 5, 0, 9]  # tokens-1, shorter (padding), empty, full [tokens] convention
    arrays = engine_routes(lengths, L, k, E, seed=E, np_dtype=np_dtype)
    inputs = [torch.from_numpy(a) for a in arrays] if as_tensor else arrays
    routes = routes_from_engine(inputs, E, S)
    assert routes.shape == (len(lengths) * S, L, k)
    assert routes.num_tokens == len(lengths) * S and routes.seq_length == S
    canonical = routes.indices
    for b, (n, a) in enumerate(zip(lengths, arrays)):
        # sequence b occupies rows b*S .. b*S+S-1; unrouted rows are missing
        assert torch.equal(canonical[b * S : b * S + n], torch.from_numpy(a.astype(np.int64)))
        assert bool((canonical[b * S + n : (b + 1) * S] == -1).all())
        assert bool(routes.missing[b * S + n : (b + 1) * S].all())
        assert not bool(routes.missing[b * S : b * S + n].any())

    torch_dtype = {np.int32: torch.int32, np.uint16: torch.uint16, np.uint8: torch.uint8}[np_dtype]
    back = routes_to_engine(routes, lengths, dtype=torch_dtype)
    for a, t in zip(arrays, back):
        assert t.dtype == torch_dtype
        assert tuple(t.shape) == a.shape
        assert np.array_equal(t.to(torch.int64).numpy(), a.astype(np.int64))


@pytest.mark.parametrize(
    "dtype,np_dtype,E",
    [(torch.int32, np.int32, 1000), (torch.uint16, np.uint16, 1000), (torch.uint8, np.uint8, 200)],
)
def test_roundtrip_base64(dtype, np_dtype, E) -> None:
    S, L, k = 7, 2, 8
    lengths = [6, 3]
    arrays = engine_routes(lengths, L, k, E, seed=1, np_dtype=np_dtype)
    routes = routes_from_engine(arrays, E, S)
    encoded = routes_to_engine(routes, lengths, dtype=dtype, base64=True)
    assert all(isinstance(x, str) for x in encoded)
    # the engine format: base64 of the flat C-order array
    assert base64.b64decode(encoded[0]) == arrays[0].tobytes()
    again = routes_from_engine(encoded, E, S, dtype=dtype, base64_shape=(L, k))
    assert torch.equal(again.indices, routes.indices)
    # bytes input, full shapes (one per sequence) and -1 token count are accepted too
    as_bytes = [x.encode("ascii") for x in encoded]
    shapes = [(n, L, k) for n in lengths]
    assert torch.equal(
        routes_from_engine(as_bytes, E, S, dtype=dtype, base64_shape=shapes).indices, routes.indices
    )
    assert torch.equal(
        routes_from_engine(encoded, E, S, dtype=np_dtype, base64_shape=(-1, L, k)).indices,
        routes.indices,
    )


def test_missing_tokens_roundtrip_with_pad_value() -> None:
    E, S, L, k = 16, 6, 2, 2
    a = engine_routes([5], L, k, E, seed=3)[0]
    a[1, :, :] = -1  # whole token not routed
    a[3, 1, :] = -1  # one layer of one token not routed
    routes = routes_from_engine([a], E, S)
    assert (
        bool(routes.missing[1].all())
        and bool(routes.missing[3, 1])
        and not bool(routes.missing[3, 0])
    )
    assert np.array_equal(routes_to_engine(routes, [5])[0].numpy(), a)
    # uint8 wire with 255 as the unsigned view of -1 (unambiguous since E <= 255)
    u8 = routes_to_engine(routes, [5], dtype=torch.uint8)[0]
    assert int(u8[1, 0, 0]) == 255
    assert torch.equal(routes_from_engine([u8], E, S).indices, routes.indices)
    # a custom pad value
    pad = np.where(a < 0, 99, a)
    assert torch.equal(routes_from_engine([pad], E, S, pad_value=99).indices, routes.indices)
    # pad_value=None: -1 is an error, not a pad
    with pytest.raises(ValueError, match="out of range"):
        routes_from_engine([a], E, S, pad_value=None)


def test_uint8_with_256_experts_has_no_pad() -> None:
    a = np.array([[[255, 0]], [[1, 2]]], dtype=np.uint8)
    routes = routes_from_engine([a], 256, 2)
    assert routes.missing is None
    assert torch.equal(routes.indices[0, 0], torch.tensor([255, 0]))
    missing = routes_from_engine([a[:1]], 256, 2)  # row 1 is missing
    with pytest.raises(ValueError, match="a valid expert id"):
        routes_to_engine(missing, [2], dtype=torch.uint8)


def test_layer_columns_and_thd() -> None:
    E, L_all, k = 8, 4, 2
    a = engine_routes([3], L_all, k, E, seed=5)[0]
    a[:, [0, 2]] = -1  # engine pads dense layers
    routes = routes_from_engine([a], E, 4, layer_columns=[1, 3])
    assert routes.shape == (4, 2, k)
    assert torch.equal(routes.indices[:3], torch.from_numpy(a[:, [1, 3]].astype(np.int64)))
    # packed THD: sequences start at cu_seqlens (padded offsets) in one packed row
    seqs = engine_routes([3, 5], 2, k, E, seed=6)
    cu = [0, 4, 12]
    packed = routes_from_engine(seqs, E, 12, cu_seqlens=cu)
    assert packed.shape == (12, 2, k)
    assert torch.equal(packed.indices[0:3], torch.from_numpy(seqs[0].astype(np.int64)))
    assert torch.equal(packed.indices[4:9], torch.from_numpy(seqs[1].astype(np.int64)))
    assert torch.equal(
        packed.missing[:, 0], torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1]).bool()
    )
    back = routes_to_engine(packed, [3, 5], cu_seqlens=cu)
    assert all(np.array_equal(t.numpy(), s) for t, s in zip(back, seqs))
    # two rows of 6 packed into one stream (megatron-core 0.19 flattening): seq_length stays 6
    flat = routes_from_engine(seqs, E, 6, cu_seqlens=cu, packed_rows=2)
    assert flat.seq_length == 6 and flat.num_tokens == 12
    assert torch.equal(flat.indices, packed.indices)
    with pytest.raises(ValueError, match="exceeds the packed stream"):
        routes_from_engine(seqs, E, 6, cu_seqlens=cu)
    with pytest.raises(ValueError, match="more than its 4 rows"):
        routes_from_engine([seqs[1], seqs[0]], E, 12, cu_seqlens=cu)


def test_validation_errors() -> None:
    E, S = 8, 5
    good = engine_routes([4, 4], 2, 2, E, seed=7)
    with pytest.raises(ValueError, match=r"sequence 1 has shape \(4, 2\)"):
        routes_from_engine([good[0], good[1][..., 0]], E, S)
    bad = [good[0], good[1].copy()]
    bad[1][2, 1, 0] = E
    with pytest.raises(ValueError, match="sequence 1, token 2, layer 1: expert id 8 out of range"):
        routes_from_engine(bad, E, S)
    dup = [good[0].copy(), good[1]]
    dup[0][3, 0] = [5, 5]
    with pytest.raises(ValueError, match="sequence 0, token 3, layer 0: duplicate expert"):
        routes_from_engine(dup, E, S)
    with pytest.raises(ValueError, match="k mismatch: sequence 1 has k=1"):
        routes_from_engine([good[0], good[1][..., :1]], E, S)
    with pytest.raises(ValueError, match="layer-count mismatch: sequence 1"):
        routes_from_engine([good[0], good[1][:, :1]], E, S)
    with pytest.raises(ValueError, match="sequence 0 has 4 routed tokens, more than its 3 rows"):
        routes_from_engine(good, E, 3)
    half = good[0].copy()
    half[0, 0, 1] = -1
    with pytest.raises(ValueError, match="some but not all"):
        routes_from_engine([half], E, S)
    with pytest.raises(ValueError, match="not integer"):
        routes_from_engine([good[0].astype(np.float32)], E, S)
    enc = base64.b64encode(good[0].tobytes()).decode()
    with pytest.raises(ValueError, match="base64_shape is not given"):
        routes_from_engine([enc], E, S)
    with pytest.raises(ValueError, match="do not fit base64_shape"):
        routes_from_engine([enc], E, S, base64_shape=(3, 2))
    with pytest.raises(ValueError, match="not valid base64"):
        routes_from_engine(["###"], E, S, base64_shape=(2, 2))
    with pytest.raises(ValueError, match="empty"):
        routes_from_engine([], E, S)
    routes = routes_from_engine(good, E, S)
    with pytest.raises(ValueError, match="sequence 1 asks for 6 rows"):
        routes_to_engine(routes, [4, 6])
    with pytest.raises(ValueError, match="cannot hold expert ids up to 999"):
        routes_to_engine(
            RouteBatch(torch.zeros(2, 1, 1, dtype=torch.int64), 1000), [1], dtype=torch.uint8
        )
    shard = RouteBatch(routes.indices[:2], E, token_index=torch.tensor([0, 1]), num_tokens=10)
    with pytest.raises(ValueError, match="canonical RouteBatch"):
        routes_to_engine(shard, [2])
