# Inference-engine routes (megatron_pr2.engines): the committed engine-response fixtures
# (tests/fixtures/engines, written by make_fixtures.py from the engines' documented formats)
# import with no manual layer columns, export back byte for byte, and every malformed variant
# raises a ValueError naming the field; plus the generic array path and EngineLayout.
#
# Engine arrays: [tokens - 1 - start, num_hidden_layers, k] per sequence, dense layers 0.
# Canonical RouteBatch: [B * S, MoE layers, k], position s of sequence b at row b * S + s.

import base64
import importlib.util
import io
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_pr2.engines import (
    EngineLayout,
    routes_from_engine,
    routes_from_sglang,
    routes_from_verl,
    routes_from_vllm,
    routes_to_engine,
    routes_to_sglang,
    routes_to_verl,
    routes_to_vllm,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "engines")
S = 16  # trainer sequence length used with the fixtures


def fixture_bytes(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as handle:
        return handle.read()


def fixture_json(name: str):
    return json.loads(fixture_bytes(name))


def fixture_npy(name: str) -> np.ndarray:
    return np.load(io.BytesIO(fixture_bytes(name)), allow_pickle=False)


def deepseek_layout() -> EngineLayout:
    return EngineLayout.from_hf_config(fixture_json("deepseek_v3_tiny.config.json"))


def request_outputs():
    """The vLLM RequestOutput of the fixture, as the in-process engine hands it over."""
    data = fixture_json("vllm_request_output.json")
    outputs = [
        SimpleNamespace(
            index=o["index"],
            token_ids=o["token_ids"],
            routed_experts=fixture_npy(o["routed_experts"]),
        )
        for o in data["outputs"]
    ]
    return SimpleNamespace(prompt_token_ids=data["prompt_token_ids"], outputs=outputs)


def expected_rows():
    """Ground truth read independently of the adapters: the .npy arrays, dense column 0 (the
    fixture config's first_k_dense_replace=1) dropped."""
    arrays = [fixture_npy(f"vllm_request_output.{i}.npy") for i in range(2)]
    for array in arrays:
        assert array.dtype == np.uint8 and array.shape[1:] == (4, 4)
        assert not array[:, 0].any()  # the engine's fill in the dense layer
    return [torch.from_numpy(a[:, 1:].astype(np.int64)) for a in arrays]


def assert_placed(routes, rows, starts=None, seq_length=S) -> None:
    indices, missing = routes.indices, routes.missing
    starts = [0] * len(rows) if starts is None else starts
    assert routes.shape == (len(rows) * seq_length, rows[0].shape[1], rows[0].shape[2])
    for b, (r, start) in enumerate(zip(rows, starts)):
        first = b * seq_length + start
        assert torch.equal(indices[first : first + r.shape[0]], r)
        routed = torch.zeros(seq_length, dtype=torch.bool)
        routed[start : start + r.shape[0]] = True
        assert torch.equal(missing[b * seq_length : (b + 1) * seq_length].any(-1), ~routed)


# ---------------------------------------------------------------------------------------------
# Fixtures: regenerate byte-identically; import; export back byte for byte.
# ---------------------------------------------------------------------------------------------
def test_fixture_script_regenerates_the_committed_files(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", f"{FIXTURES}/make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = module.write(str(tmp_path))
    committed = sorted(n for n in os.listdir(FIXTURES) if n != "make_fixtures.py" and "." in n)
    assert names == [n for n in committed if not n.endswith(".pyc")]
    for name in names:
        assert (tmp_path / name).read_bytes() == fixture_bytes(name), name
        assert len(fixture_bytes(name)) < 4096, name  # a few KiB each


def test_vllm_in_process_and_http_fixtures() -> None:
    layout, rows = deepseek_layout(), expected_rows()
    assert layout.moe_layers == (1, 2, 3) and layout.dense_layers == (0,)
    in_process = routes_from_vllm(request_outputs(), layout, seq_length=S)
    assert_placed(in_process, rows)
    response = fixture_json("vllm_completions.response.json")
    http = routes_from_vllm(response, layout, seq_length=S)
    assert_placed(http, rows)
    # export back: the in-process arrays and the HTTP strings, byte for byte
    counts = [7 + len(o.token_ids) for o in request_outputs().outputs]
    arrays = routes_to_vllm(in_process, layout, counts)
    for array, out in zip(arrays, request_outputs().outputs):
        assert array.dtype == out.routed_experts.dtype and np.array_equal(array, out.routed_experts)
    strings = routes_to_vllm(http, layout, counts, http=True)
    assert strings == [c["routed_experts"] for c in response["choices"]]
    # the HTTP payload is a real .npy file: numpy reads it on its own
    first = np.load(io.BytesIO(base64.b64decode(strings[0])), allow_pickle=False)
    assert np.array_equal(first, request_outputs().outputs[0].routed_experts)


def test_vllm_prompt_start_fixture_uint16() -> None:
    layout = EngineLayout.from_hf_config(fixture_json("kimi_k2_tiny.config.json"))
    assert (layout.num_experts, layout.topk, layout.moe_layers) == (384, 8, (1, 2))
    request = fixture_json("vllm_prompt_start.request.json")
    response = fixture_json("vllm_prompt_start.response.json")
    start = request["routed_experts_prompt_start"]
    raw = np.load(io.BytesIO(base64.b64decode(response["choices"][0]["routed_experts"])))
    assert raw.dtype == np.uint16 and raw.shape == (10 + 4 - 1 - start, 3, 8)
    routes = routes_from_vllm(response, layout, seq_length=S, prompt_start=start)
    assert_placed(routes, [torch.from_numpy(raw[:, 1:].astype(np.int64))], starts=(start,))
    # the start offset is not in the response: without it the row count does not match
    with pytest.raises(ValueError, match=r"token count expected 13 route rows .* given 7"):
        routes_from_vllm(response, layout, seq_length=S)
    out = routes_to_vllm(routes, layout, [14], prompt_start=start, http=True)
    assert out == [response["choices"][0]["routed_experts"]]


def test_sglang_fixtures() -> None:
    layout, rows = deepseek_layout(), expected_rows()
    response = fixture_json("sglang_generate.response.json")
    routes = routes_from_sglang(response, layout, seq_length=S)
    assert_placed(routes, rows)
    metas = routes_to_sglang(routes, layout, [7, 7], [5, 8])
    assert [m["routed_experts"] for m in metas] == [
        r["meta_info"]["routed_experts"] for r in response
    ]
    # one response dict, or its meta_info alone, is one sequence
    single = routes_from_sglang(response[1]["meta_info"], layout, seq_length=S)
    assert_placed(single, rows[1:])


def test_sglang_multi_turn_chunks_fixture() -> None:
    layout = deepseek_layout()
    requests = fixture_json("sglang_session.request.json")
    response = fixture_json("sglang_session.response.json")
    starts = [r["routed_experts_start_len"] for r in requests]
    assert starts == [0, 8]
    chunks = [
        np.frombuffer(base64.b64decode(r["meta_info"]["routed_experts"]), "<i4").reshape(-1, 4, 4)
        for r in response
    ]
    truth = torch.from_numpy(np.concatenate(chunks)[:, 1:].astype(np.int64))
    assert truth.shape[0] == 12 + 4 - 1
    routes = routes_from_sglang([response], layout, seq_length=S, start_len=[starts])
    assert_placed(routes, [truth])
    # an overlapping later chunk replaces the rows it covers (turn 2 re-sent from position 6)
    redo = routes_to_sglang(routes, layout, [12], [4], start_len=6)[0]
    again = routes_from_sglang([[response[0], {"meta_info": redo}]], layout, S, start_len=[[0, 6]])
    assert torch.equal(again.indices, routes.indices)
    # a scalar start_len cannot describe two chunks
    with pytest.raises(ValueError, match="start_len expected a list with one entry per chunk"):
        routes_from_sglang([response], layout, seq_length=S, start_len=8)
    # a wrong offset shows in the row count; a gap between chunks is an offsets error
    with pytest.raises(ValueError, match=r"chunk 1: token count expected 6 route rows"):
        routes_from_sglang([response], layout, seq_length=S, start_len=[[0, 9]])
    late = routes_to_sglang(routes, layout, [12], [4], start_len=9)[0]
    with pytest.raises(
        ValueError, match=r"chunk 1: offsets: routed_experts_start_len expected in \[0, 8\]"
    ):
        routes_from_sglang([[response[0], late]], layout, seq_length=S, start_len=[[0, 9]])


def test_verl_fixture_and_layouts() -> None:
    layout, rows = deepseek_layout(), expected_rows()
    batch = fixture_npy("verl_batch.routed_experts.npy")
    mask = fixture_npy("verl_batch.attention_mask.npy")
    padded = routes_from_verl(batch, mask, layout)
    assert_placed(padded, rows, starts=(1, 1))  # prompt of 7 left-padded to 8
    unpadded = routes_from_verl(
        torch.from_numpy(batch), torch.from_numpy(mask), layout, remove_padding=True
    )
    assert torch.equal(unpadded.indices, routes_from_vllm(request_outputs(), layout, S).indices)
    assert np.array_equal(routes_to_verl(padded, layout, mask), batch)
    packed = routes_from_verl(batch, mask, layout, seq_length=32, cu_seqlens=[0, 12, 27])
    assert torch.equal(packed.indices[:11], rows[0]) and torch.equal(packed.indices[12:26], rows[1])
    assert bool(packed.missing[11].all()) and bool(packed.missing[26:].all())


# ---------------------------------------------------------------------------------------------
# Malformed responses: every one raises a ValueError naming the field.
# ---------------------------------------------------------------------------------------------
def _npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def _vllm_array_cases():
    good = request_outputs().outputs[0].routed_experts  # [11, 4, 4] uint8

    def edit(fn):
        array = good.copy()
        fn(array)
        return array

    def dup(a):
        a[2, 3, 1] = a[2, 3, 0]

    def out_of_range(a):
        a[4, 2, 0] = 16

    def dense(a):
        a[5, 0, :] = [3, 1, 2, 7]

    return [
        (
            "dense",
            edit(dense),
            {},
            r"position 5: dense layer 0 expected the engine fill 0, given \[3, 1, 2, 7\]",
        ),
        ("layers", good[:, 1:], {}, r"layer count expected 4 .* given 3"),
        ("k", good[..., :2], {}, r"k expected 4, given 2"),
        (
            "id range",
            edit(out_of_range),
            {},
            r"position 4, MoE layer 1: expert id expected in \[0, 16\), given 16 \(physical",
        ),
        ("duplicate", edit(dup), {}, r"position 2, MoE layer 2: top-k experts expected distinct"),
        (
            "tokens",
            good[:-1],
            {"num_tokens": 12},
            r"token count expected 11 route rows \(num_tokens 12 - 1 - prompt_start 0\), given 10",
        ),
        (
            "offsets",
            good,
            {"prompt_start": -1},
            r"offsets: rows cover positions \[-1, 10\), expected within the sequence's 16 rows",
        ),
        (
            "past end",
            good,
            {"prompt_start": 6},
            r"offsets: rows cover positions \[6, 17\), expected within the sequence's 16 rows",
        ),
        ("float", good.astype(np.float32), {}, r"dtype expected an integer array, given float32"),
        ("ndim", good[0], {}, r"shape expected \[tokens, layers, k\]"),
        ("none", None, {}, r"routed_experts is None"),
    ]


@pytest.mark.parametrize(
    "name,array,kwargs,message", _vllm_array_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_vllm_malformed_arrays(name, array, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        routes_from_vllm([array], deepseek_layout(), seq_length=S, **kwargs)


def test_vllm_malformed_http_payloads() -> None:
    layout = deepseek_layout()
    response = fixture_json("vllm_completions.response.json")
    good = response["choices"][0]["routed_experts"]
    raw = base64.b64decode(good)
    cases = [
        (base64.b64encode(b"\x00NUMPY" + raw[6:]).decode(), r"npy magic expected"),
        (
            _npy_b64(request_outputs().outputs[0].routed_experts.astype(np.float32)),
            r"npy dtype expected an integer dtype, given <f4",
        ),
        (
            base64.b64encode(raw[:-3]).decode(),
            r"npy data size expected 176 bytes for shape \(11, 4, 4\) \|u1, given 173",
        ),
        (base64.b64encode(raw + b"\x00").decode(), r"npy data size expected 176 bytes"),
        (base64.b64encode(raw[:40]).decode(), r"malformed .npy header"),
        ("###", r"not valid base64"),
        # SGLang's flat buffer sent where vLLM's .npy is expected
        (
            base64.b64encode(np.zeros(176, "<i4").tobytes()).decode(),
            r"npy magic expected .* routes_from_sglang",
        ),
    ]
    for payload, message in cases:
        with pytest.raises(ValueError, match=message):
            routes_from_vllm([payload], layout, seq_length=S)
    # a token count that disagrees with the response's own prompt_token_ids + token_ids
    with pytest.raises(ValueError, match=r"choice 0: num_tokens expected 12 \(prompt \+ generated"):
        routes_from_vllm(response, layout, seq_length=S, num_tokens=[13, 15])
    # a uint8 array cannot come from a model with more than 256 experts
    big = EngineLayout(4, (1, 2, 3), 384, 4)
    with pytest.raises(
        ValueError,
        match=r"dtype uint8 holds ids up to 255, expected one that holds num_experts=384",
    ):
        routes_from_vllm([request_outputs().outputs[0].routed_experts], big, seq_length=S)
    # a big-endian .npy is read in the byte order its header declares
    swapped = request_outputs().outputs[0].routed_experts.astype(">u2")
    routes = routes_from_vllm([_npy_b64(swapped)], layout, seq_length=S)
    assert torch.equal(routes.indices[:11], expected_rows()[0])


def test_sglang_malformed_meta_info() -> None:
    layout = deepseek_layout()
    meta = fixture_json("sglang_generate.response.json")[0]["meta_info"]
    flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4")

    def variant(**changes):
        return {**meta, **changes}

    cases = [
        (
            variant(routed_experts=base64.b64encode(flat[:-1].tobytes()).decode()),
            {},
            r"value count expected a multiple of num_layers \* k = 4 \* 4, given 175",
        ),
        (
            variant(routed_experts=base64.b64encode(flat.tobytes()[:-2]).decode()),
            {},
            r"byte count expected a multiple of 4 \(int32\), given 702",
        ),
        (
            variant(completion_tokens=6),
            {},
            r"token count expected 12 route rows \(num_tokens 13 - 1 - routed_experts_start_len 0\), given 11",
        ),
        (variant(routed_experts=None), {}, r"meta_info has no routed_experts"),
        # native (big-endian) int32 is not what SGLang sends: ids land out of range
        (
            variant(routed_experts=base64.b64encode(flat.astype(">i4").tobytes()).decode()),
            {},
            r"expert id expected in \[0, 16\)",
        ),
        (
            variant(routed_experts=_npy_b64(flat.reshape(11, 4, 4))),
            {},
            r"expected a flat int32 buffer, given a .npy file",
        ),
        (
            variant(routed_experts_start_len=2),
            {"start_len": 3},
            r"start_len expected 2 \(meta_info routed_experts_start_len\), given 3",
        ),
        (
            variant(routed_experts_dtype="float32"),
            {},
            r"Unsupported|dtype expected an integer dtype, given float32",
        ),
        (meta, {"start_len": [0, 0]}, r"start_len entries expected 1 \(sequences\), given 2"),
    ]
    for bad, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            routes_from_sglang({"meta_info": bad}, layout, seq_length=S, **kwargs)
    # a narrower dtype announced by the sender is honoured
    narrow = variant(
        routed_experts=base64.b64encode(flat.astype("u1").tobytes()).decode(),
        routed_experts_dtype="uint8",
    )
    assert torch.equal(
        routes_from_sglang(narrow, layout, S).indices, routes_from_sglang(meta, layout, S).indices
    )


def test_verl_malformed_batches() -> None:
    layout = deepseek_layout()
    batch = fixture_npy("verl_batch.routed_experts.npy")
    mask = fixture_npy("verl_batch.attention_mask.npy")
    holes = mask.copy()
    holes[0, 4] = 0
    with pytest.raises(
        ValueError, match=r"attention_mask row 0 expected one contiguous run of ones"
    ):
        routes_from_verl(batch, holes, layout)
    shifted = mask.copy()
    shifted[1, 0] = 1  # the mask claims one more prompt token than the routes hold
    shifted[1, 15] = 0
    with pytest.raises(
        ValueError,
        match=r"sequence 1, row 14: expected the fill 0 outside the routed rows \[0, 14\)",
    ):
        routes_from_verl(batch, shifted, layout)
    with pytest.raises(ValueError, match=r"shapes expected routed_experts \[B, T, layers, k\]"):
        routes_from_verl(batch, mask[:, :-1], layout)


def test_expert_map_physical_to_logical() -> None:
    layout = deepseek_layout()
    truth = expected_rows()
    # an EPLB deployment with 20 physical slots: slot p serves logical expert p % 16
    physical_to_logical = np.arange(20) % 16
    rng = np.random.default_rng(0)
    arrays = []
    for out in request_outputs().outputs:
        array = out.routed_experts.astype(np.int64)
        moe = array[:, 1:]
        use_replica = (moe < 4) & (rng.random(moe.shape) < 0.5)
        array[:, 1:] = np.where(use_replica, moe + 16, moe)
        arrays.append(array)
    assert (np.concatenate(arrays) >= 16).any()
    with pytest.raises(
        ValueError, match=r"given 1[6-9] \(physical expert ids of an EPLB deployment"
    ):
        routes_from_vllm(arrays, layout, seq_length=S)
    routes = routes_from_vllm(arrays, layout, seq_length=S, expert_map=physical_to_logical)
    assert_placed(routes, truth)
    per_layer = np.stack([physical_to_logical] * 4)  # [num_hidden_layers, physical]
    assert torch.equal(
        routes_from_vllm(arrays, layout, S, expert_map=per_layer).indices, routes.indices
    )
    with pytest.raises(
        ValueError, match=r"expert_map shape expected \[physical\] or \[layers, physical\]"
    ):
        routes_from_vllm(arrays, layout, S, expert_map=np.zeros((2, 20), np.int64))
    with pytest.raises(ValueError, match=r"physical expert id expected in \[0, 18\)"):
        routes_from_vllm(arrays, layout, S, expert_map=physical_to_logical[:18])
    with pytest.raises(ValueError, match=r"top-k experts expected distinct"):
        routes_from_vllm(arrays, layout, S, expert_map=np.arange(20) % 2)


# ---------------------------------------------------------------------------------------------
# EngineLayout from model configs.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,moe",
    [
        (
            {
                "model_type": "deepseek_v3",
                "num_hidden_layers": 6,
                "first_k_dense_replace": 3,
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
            },
            (3, 4, 5),
        ),
        (
            {
                "model_type": "deepseek_v2",
                "num_hidden_layers": 6,
                "first_k_dense_replace": 1,
                "moe_layer_freq": 2,
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
            },
            (2, 4),
        ),
        (
            {
                "model_type": "qwen3_moe",
                "num_hidden_layers": 5,
                "mlp_only_layers": [0, 3],
                "decoder_sparse_step": 1,
                "num_experts": 8,
                "num_experts_per_tok": 2,
            },
            (1, 2, 4),
        ),
        (
            {
                "model_type": "qwen2_moe",
                "num_hidden_layers": 6,
                "mlp_only_layers": [],
                "decoder_sparse_step": 2,
                "num_experts": 8,
                "num_experts_per_tok": 2,
            },
            (1, 3, 5),
        ),
        (
            {
                "model_type": "mixtral",
                "num_hidden_layers": 3,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
            },
            (0, 1, 2),
        ),
        (
            {
                "model_type": "olmoe",
                "num_hidden_layers": 2,
                "num_experts": 64,
                "num_experts_per_tok": 8,
            },
            (0, 1),
        ),
        (
            {
                "model_type": "qwen3_vl_moe",
                "text_config": {
                    "model_type": "qwen3_vl_moe_text",
                    "num_hidden_layers": 2,
                    "decoder_sparse_step": 1,
                    "num_experts": 8,
                    "num_experts_per_tok": 2,
                },
            },
            (0, 1),
        ),
    ],
)
def test_layout_from_hf_config_dicts(config, moe) -> None:
    assert EngineLayout.from_hf_config(config).moe_layers == moe


def test_layout_from_transformers_and_megatron_configs() -> None:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    qwen = Qwen3MoeConfig(
        num_hidden_layers=4, mlp_only_layers=[0], num_experts=8, num_experts_per_tok=2
    )
    deepseek = DeepseekV3Config(
        num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4
    )
    mixtral = MixtralConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    assert EngineLayout.from_config(qwen) == EngineLayout(4, (1, 2, 3), 8, 2)
    assert EngineLayout.from_config(deepseek) == EngineLayout(4, (2, 3), 16, 4)
    assert EngineLayout.from_config(mixtral) == EngineLayout(2, (0, 1), 4, 2)
    megatron = SimpleNamespace(
        num_layers=4, moe_layer_freq=[0, 0, 1, 1], num_moe_experts=16, moe_router_topk=4
    )
    assert EngineLayout.from_config(megatron) == EngineLayout.from_config(deepseek)
    assert EngineLayout.from_megatron_config(
        SimpleNamespace(num_layers=4, moe_layer_freq=2, num_moe_experts=8, moe_router_topk=2)
    ).moe_layers == (0, 2)
    with pytest.raises(
        ValueError, match=r"moe_layer_freq=\[1, 1\] must be an int or a list of num_layers=4"
    ):
        EngineLayout.from_megatron_config(
            SimpleNamespace(
                num_layers=4, moe_layer_freq=[1, 1], num_moe_experts=8, moe_router_topk=2
            )
        )
    with pytest.raises(ValueError, match=r"model_type='llama4_text' is not a family"):
        EngineLayout.from_hf_config(
            {
                "model_type": "llama4_text",
                "num_hidden_layers": 2,
                "num_experts": 4,
                "num_experts_per_tok": 1,
            }
        )
    with pytest.raises(ValueError, match=r"is it an MoE model"):
        EngineLayout.from_hf_config({"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"moe_layers=\(3, 1\): must be distinct ascending"):
        EngineLayout(4, (3, 1), 8, 2)
    with pytest.raises(ValueError, match=r"topk=9: must be in \[1, num_experts=8\]"):
        EngineLayout(4, (1,), 8, 9)


# ---------------------------------------------------------------------------------------------
# Generic arrays (routes_from_engine / routes_to_engine).
# ---------------------------------------------------------------------------------------------
def engine_routes(lengths, L, k, E, seed, np_dtype=np.int32):
    """Per-sequence arrays of MoE layers with distinct experts per (token, layer)."""
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((n, L, E)), axis=-1)[..., :k].astype(np_dtype) for n in lengths]


@pytest.mark.parametrize(
    "np_dtype,E",
    [(np.int32, 1000), (np.int32, 8), (np.uint16, 1000), (np.uint8, 64), (np.uint8, 256)],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_roundtrip_arrays(np_dtype, E, as_tensor) -> None:
    L, k = 3, 2
    lengths = [8, 5, 0, 9]  # tokens-1, shorter (padding), empty, full
    arrays = engine_routes(lengths, L, k, E, seed=E, np_dtype=np_dtype)
    inputs = [torch.from_numpy(a) for a in arrays] if as_tensor else arrays
    routes = routes_from_engine(inputs, E, 9)
    assert routes.num_tokens == len(lengths) * 9 and routes.seq_length == 9
    assert_placed(routes, [torch.from_numpy(a.astype(np.int64)) for a in arrays], seq_length=9)
    torch_dtype = {np.int32: torch.int32, np.uint16: torch.uint16, np.uint8: torch.uint8}[np_dtype]
    for a, t in zip(arrays, routes_to_engine(routes, lengths, dtype=torch_dtype)):
        assert t.dtype == torch_dtype and np.array_equal(t.to(torch.int64).numpy(), a)


@pytest.mark.parametrize("dtype,E", [(torch.int32, 1000), (torch.uint16, 1000), (torch.uint8, 200)])
def test_roundtrip_flat_base64_is_little_endian(dtype, E) -> None:
    lengths, L, k = [6, 3], 2, 8
    np_dtype = {torch.int32: "<i4", torch.uint16: "<u2", torch.uint8: "u1"}[dtype]
    arrays = engine_routes(lengths, L, k, E, seed=1, np_dtype=np_dtype)
    routes = routes_from_engine(arrays, E, 7)
    encoded = routes_to_engine(routes, lengths, dtype=dtype, base64=True)
    assert base64.b64decode(encoded[0]) == arrays[0].tobytes()  # explicit little-endian bytes
    shapes = [(n, L, k) for n in lengths]
    again = routes_from_engine(encoded, E, 7, dtype=dtype, base64_shape=shapes)
    assert torch.equal(again.indices, routes.indices)
    as_bytes = [x.encode("ascii") for x in encoded]
    assert torch.equal(
        routes_from_engine(as_bytes, E, 7, dtype=dtype, base64_shape=shapes).indices, routes.indices
    )


def test_pad_value_layout_starts_and_packed_thd() -> None:
    E, L, k = 16, 2, 2
    a = engine_routes([5], L, k, E, seed=3)[0]
    a[1, :, :] = -1  # whole token not routed
    a[3, 1, :] = -1  # one layer of one token not routed
    with pytest.raises(ValueError, match=r"expert id expected in \[0, 16\), given -1"):
        routes_from_engine([a], E, 6)  # no pad value unless asked for
    routes = routes_from_engine([a], E, 6, pad_value=-1)
    assert (
        bool(routes.missing[1].all())
        and bool(routes.missing[3, 1])
        and not bool(routes.missing[3, 0])
    )
    assert np.array_equal(routes_to_engine(routes, [5])[0].numpy(), a)
    u8 = routes_to_engine(routes, [5], dtype=torch.uint8)[0]  # -1 written as 255 (E <= 255)
    assert int(u8[1, 0, 0]) == 255
    assert torch.equal(routes_from_engine([u8], E, 6, pad_value=-1).indices, routes.indices)
    with pytest.raises(ValueError, match=r"pad_value=-1 expected in all 2 slots or none"):
        bad = a.copy()
        bad[0, 0, 0] = -1
        routes_from_engine([bad], E, 6, pad_value=-1)
    # every engine layer + a layout; start offsets
    full = np.zeros((5, 4, k), np.int32)
    full[:, [1, 3]] = engine_routes([5], L, k, E, seed=4)[0]
    layout = EngineLayout(4, (1, 3), E, k)
    placed = routes_from_engine([full], None, 8, layout=layout, starts=[2])
    assert torch.equal(placed.indices[2:7], torch.from_numpy(full[:, [1, 3]].astype(np.int64)))
    assert bool(placed.missing[:2].all()) and bool(placed.missing[7:].all())
    assert np.array_equal(routes_to_engine(placed, [5], layout=layout, starts=[2])[0].numpy(), full)
    with pytest.raises(ValueError, match=r"num_experts expected layout.num_experts=16, given 8"):
        routes_from_engine([full], 8, 8, layout=layout)
    # packed THD: sequences at cu_seqlens offsets of one packed stream
    seqs = engine_routes([3, 5], L, k, E, seed=2)
    cu = [0, 4, 10]
    packed = routes_from_engine(seqs, E, 12, cu_seqlens=cu)
    assert torch.equal(packed.indices[4:9], torch.from_numpy(seqs[1].astype(np.int64)))
    assert bool(packed.missing[3].all()) and bool(packed.missing[9:].all())
    assert [t.tolist() for t in routes_to_engine(packed, [3, 5], cu_seqlens=cu)] == [
        s.tolist() for s in seqs
    ]
    two_rows = routes_from_engine(seqs, E, 6, cu_seqlens=cu, packed_rows=2)
    assert torch.equal(two_rows.indices, packed.indices)
    with pytest.raises(
        ValueError, match=r"cu_seqlens\[-1\] expected <= packed_rows \* seq_length = 6"
    ):
        routes_from_engine(seqs, E, 6, cu_seqlens=cu)
    with pytest.raises(
        ValueError,
        match=r"offsets: rows cover positions \[0, 5\), expected within the sequence's 4 rows",
    ):
        routes_from_engine([seqs[1], seqs[0]], E, 12, cu_seqlens=cu)


def test_generic_errors() -> None:
    E, S_ = 8, 4
    good = engine_routes([3, 2], 2, 2, E, seed=5)
    cases = [
        (
            lambda: routes_from_engine([good[0], good[1][..., 0]], E, S_),
            r"shape expected \[tokens, layers, k\]",
        ),
        (
            lambda: routes_from_engine([good[0], good[1][..., :1]], E, S_),
            r"sequence 1: k expected 2, given 1",
        ),
        (
            lambda: routes_from_engine([good[0], good[1][:, :1]], E, S_),
            r"MoE layer count expected 2, given 1",
        ),
        (
            lambda: routes_from_engine(good, E, 2),
            r"sequence 0: offsets: rows cover positions \[0, 3\)",
        ),
        (
            lambda: routes_from_engine([good[0].astype(np.float32)], E, S_),
            r"dtype expected an integer array",
        ),
        (
            lambda: routes_from_engine([base64.b64encode(good[0].tobytes())], E, S_),
            r"base64 data needs base64_shape",
        ),
        (
            lambda: routes_from_engine(
                [base64.b64encode(good[0].tobytes())], E, S_, base64_shape=(5, 5, 2)
            ),
            r"value count expected 50 for base64_shape",
        ),
        (
            lambda: routes_from_engine(
                [base64.b64encode(good[0].tobytes())], E, S_, base64_shape=(-1, 5, 2)
            ),
            r"base64_shape expected \(n, C, k\) with every size given",
        ),
        (lambda: routes_from_engine(["###"], E, S_, base64_shape=(1, 2, 2)), r"not valid base64"),
        (lambda: routes_from_engine([], E, S_), r"the response holds no sequence"),
        (
            lambda: routes_from_engine(good, E, S_, starts=[0]),
            r"starts entries expected 2, given 1",
        ),
        (
            lambda: routes_to_engine(routes_from_engine(good, E, S_), [4, 6]),
            r"sequence 1: offsets: positions \[0, 6\)",
        ),
        (
            lambda: routes_to_engine(routes_from_engine(good, E, S_), [4, 2], pad_value=3),
            r"position 3: has no route",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    routes = routes_from_engine(good, E, S_)
    shard = type(routes)(routes.indices[:2], E, token_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a canonical RouteBatch"):
        routes_to_engine(shard, [2])


# ---------------------------------------------------------------------------------------------
# The README's "R3 with vLLM / SGLang" example, run against the fixtures.
# ---------------------------------------------------------------------------------------------
def readme_example() -> str:
    readme = open(os.path.join(FIXTURES, "..", "..", "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## R3 with vLLM / SGLang", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has one python example"
    return blocks[0]


def test_readme_example_runs_on_the_fixtures() -> None:
    from single_rank import single_rank

    example = readme_example()
    assert len(example.strip().splitlines()) <= 14
    with single_rank():
        from harness import build_tiny_gpt, make_moe_config
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        from megatron_pr2 import PR2Config, apply_pr2

        config = make_moe_config(
            num_layers=4,
            moe_layer_freq=[0, 1, 1, 1],
            num_moe_experts=16,
            moe_router_topk=4,
            hidden_size=32,
            num_attention_heads=4,
            ffn_hidden_size=32,
            moe_ffn_hidden_size=16,
        )
        spec = apply_pr2(
            get_gpt_decoder_block_spec(config, use_transformer_engine=False),
            PR2Config(missing_route_policy="fallback"),
        )
        model = build_tiny_gpt(config, vocab_size=128, seq_len=S, spec=spec)
        namespace = {
            "hf_config": fixture_json("deepseek_v3_tiny.config.json"),
            "request_outputs": [request_outputs()],
            "completion_json": fixture_json("vllm_completions.response.json"),
            "generate_json": fixture_json("sglang_generate.response.json"),
            "S": S,
            "model": model,
            "input_ids": torch.randint(0, 128, (2, S)),
            "position_ids": torch.arange(S).expand(2, S),
        }
        exec(compile(example, "README.md", "exec"), namespace)
    assert_placed(namespace["routes"], expected_rows())
    assert tuple(namespace["output"].shape) == (2, S, 128)


def test_base64_with_the_wrong_dtype_is_refused() -> None:
    # int32 routes of a 3-row sequence read as uint8 would be 4x the values: with the row count
    # declared, the value count cannot fit, whatever the sequence length leaves room for.
    E, k, L = 8, 1, 2
    routes = np.array([[[1], [2]], [[3], [4]], [[5], [6]]], dtype="<i4")
    payload = base64.b64encode(routes.tobytes())
    again = routes_from_engine([payload], E, 64, dtype=np.int32, base64_shape=(3, L, k))
    assert again.indices[:3].tolist() == routes.tolist()
    with pytest.raises(ValueError, match=r"value count expected 6 .* given 24 \(another dtype\?\)"):
        routes_from_engine([payload], E, 64, dtype=np.uint8, base64_shape=(3, L, k))
