# PR2 predictor replicas under parallelism, against a single-process reference (tests/harness.py).
#
#   * TP2 + SP x DP2 GPT with Megatron DDP (overlap_grad_reduce=True) + finalize_model_grads:
#     predict_record -> drift -> replay for mini-steps [2, 1, 2], SGD on the predictor only.
#     Predictor gradients must equal the reference's (max abs error <= 1e-5 x the largest
#     reference predictor gradient; fp32), be bit-identical on all four ranks (TP peers all-reduce
#     them as sequence-parallel params, DP peers through DDP), the weights stay bit-identical, and
#     a mini-step-1 step yields predictor grads that exist and are exactly zero without DDP ever
#     waiting on a bucket (with overlap_grad_reduce, a parameter whose grad never arrives makes
#     finish_grad_sync assert "Communication call has not been issued for this bucket").
#     Two cache densities: 4 cached tokens per sequence (every SP shard holds 2 of them) and 1
#     (position 0 only: the second SP shard has no cached token at all).
#   * TP2 without SP (eval mode, as in a rollout): predict_record gives identical routes and
#     predictor caches on both TP ranks, equal to the single-rank predict_record.
#   * Megatron dist_checkpointing: sharded_state_dict saved on 2 ranks (TP2 + SP) and loaded into a
#     fresh model on the same layout and on EP2 / PP2: predictor and router weights exact.
#
# Model: the 4-layer GPT of test_parallel_pipeline (first layer dense), hidden 32, 8 experts
# top-2, micro-batch size 2, sequences of 16 tokens; DP rank d trains on microbatch d, the
# reference on both (the schedule's 1 / num_microbatches equals DDP's average over DP).

import pytest
import torch
from harness import init_megatron_parallel, run_distributed
from par_util import tiny_gpt_config

VOCAB, SEQ, MBS = 64, 16, 2
MINISTEPS = [2, 1, 2]
PREDICTOR_LR = 10.0
TOL = 1e-5


def _step_data(step):
    from par_util import gpt_microbatches

    return gpt_microbatches(2, MBS, SEQ, VOCAB, seed=300 + step)  # one microbatch per DP rank


def _predictor_keys(model):
    from par_util import full_key, sharded_params

    return {full_key(sh) for name, sh, _ in sharded_params(model) if ".predictor." in name}


def _predictor_params(model):
    from par_util import as_chunks, unwrap

    from megatron_pr2 import pr2_routers

    routers = pr2_routers([unwrap(c) for c in as_chunks(model)])
    return [
        p for r in sorted(routers, key=lambda r: r.moe_layer_id) for p in r.predictor.parameters()
    ]


def _sgd_predictor(model):
    from par_util import param_grad

    with torch.no_grad():
        for param in _predictor_params(model):
            param.sub_(PREDICTOR_LR * param_grad(param))


def _reference_training(cache_tokens):
    """Single process: per step predict_record, drift, replay at the step's mini-step."""
    from par_util import build_pr2_gpt, drift_routers, full_tensors, run_schedule

    from megatron_pr2 import routing

    torch.manual_seed(3)
    model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ, cache_tokens_per_sequence=cache_tokens)
    weights = full_tensors(model)
    keys = _predictor_keys(model)
    steps = []
    for step, ministep in enumerate(MINISTEPS):
        data = _step_data(step)
        with routing(model, "predict_record") as handle:
            run_schedule(model, data, SEQ, MBS, forward_only=True)
        routes = handle.routes_per_microbatch
        drift_routers(model, seed=step)
        model[0].zero_grad(set_to_none=True)
        with routing(model, "replay", routes=routes, ministep=ministep):
            run_schedule(model, data, SEQ, MBS, forward_only=False)
        grads = full_tensors(model, "grad")
        steps.append(dict(routes=routes, grads={k: grads[k] for k in keys}))
        _sgd_predictor(model)
    return dict(weights=weights, steps=steps, final=full_tensors(model))


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def _parallel_training(ref, cache_tokens):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from par_util import (
        build_pr2_gpt,
        compare_to_full,
        drift_routers,
        load_full,
        param_grad,
        run_schedule,
        wrap_ddp,
    )

    from megatron_pr2 import routing
    from megatron_pr2.parallel import gather_routes, layout_for_rank

    out = dict(steps=[])
    with init_megatron_parallel(tp=2):
        config = tiny_gpt_config()
        model = wrap_ddp(
            config,
            build_pr2_gpt(config, VOCAB, SEQ, cache_tokens_per_sequence=cache_tokens),
            overlap=True,
        )
        load_full(model, ref["weights"])
        predictor = _predictor_params(model)
        out["predictor_tagged_sequence_parallel"] = all(
            getattr(p, "sequence_parallel", False) for p in predictor
        )
        dp_rank = ps.get_data_parallel_rank()
        layout = layout_for_rank(
            MBS, SEQ, tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=2, sequence_parallel=True
        )
        for step, ministep in enumerate(MINISTEPS):
            data = [_step_data(step)[dp_rank]]
            with routing(model, "predict_record", layout=layout) as handle:
                run_schedule(model, data, SEQ, MBS, forward_only=True)
            (shard,) = handle.routes_per_microbatch
            canonical = gather_routes(shard, group=ps.get_tensor_model_parallel_group())
            record_ok = canonical is None or torch.equal(
                canonical.indices, ref["steps"][step]["routes"][dp_rank].indices
            )
            drift_routers(model, seed=step)
            for chunk in model:
                chunk.zero_grad_buffer()
            with routing(model, "replay", routes=[shard], ministep=ministep):
                run_schedule(model, data, SEQ, MBS, forward_only=False)
            finalize_model_grads(model)  # asserts if a bucket never received all its grads
            ref_grads = ref["steps"][step]["grads"]
            errors = compare_to_full_subset(model, ref_grads)
            grads = _flat([param_grad(p) for p in predictor])
            everyone = [torch.zeros_like(grads) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, grads)
            out["steps"].append(
                dict(
                    ministep=ministep,
                    record_ok=record_ok,
                    cached_here=0 if shard.cache is None else shard.cache.token_index.numel(),
                    grad_err=max(errors.values()),
                    grad_scale=max(float(g.abs().max()) for g in ref_grads.values()),
                    grads_identical_on_all_ranks=all(torch.equal(g, grads) for g in everyone),
                    grads_all_zero=bool((grads == 0).all()),
                    router_grads_nonzero=all(
                        bool(param_grad(r.weight).abs().sum() > 0) for r in _routers(model)
                    ),
                )
            )
            _sgd_predictor(model)
        weights = _flat(predictor)
        everyone = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, weights)
        out["weights_identical_on_all_ranks"] = all(torch.equal(w, weights) for w in everyone)
        final_err = compare_to_full(model, ref["final"], "data")
        out["final_predictor_err"] = max(v for k, v in final_err.items() if ".predictor." in k)
        out["predictor_moved"] = float(weights.abs().max())
    return out


def _routers(model):
    from par_util import as_chunks, unwrap

    from megatron_pr2 import pr2_routers

    return pr2_routers([unwrap(c) for c in as_chunks(model)])


def compare_to_full_subset(model, full):
    """compare_to_full restricted to the parameters whose full tensors `full` holds."""
    from par_util import full_key, local_slice, param_grad, sharded_params

    out = {}
    for name, sh, param in sharded_params(model):
        key = full_key(sh)
        if key in full:
            ref = full[key][local_slice(sh, param.shape)]
            out[name] = float((param_grad(param).float() - ref.float()).abs().max())
    return out


def _tp_rollout_routes(ref_routes):
    """TP2 without SP, eval mode: predict_record on both TP ranks of each DP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from par_util import build_pr2_gpt, load_full, run_schedule

    from megatron_pr2 import routing
    from megatron_pr2.parallel import gather_routes

    with init_megatron_parallel(tp=2):
        config = tiny_gpt_config(sequence_parallel=False)
        model = build_pr2_gpt(config, VOCAB, SEQ, cache_tokens_per_sequence=4)
        load_full(model, ref_routes["weights"])
        for chunk in model:
            chunk.eval()
        dp_rank = ps.get_data_parallel_rank()
        data = [_step_data(0)[dp_rank]]
        with torch.no_grad(), routing(model, "predict_record") as handle:
            run_schedule(model, data, SEQ, MBS, forward_only=True)
        routes = handle.routes
        tp_group = ps.get_tensor_model_parallel_group()
        peers = [None] * 2
        dist.all_gather_object(peers, (routes.indices, routes.cache), group=tp_group)
        same_on_tp_peers = torch.equal(peers[0][0], peers[1][0]) and all(
            torch.equal(getattr(peers[0][1], f), getattr(peers[1][1], f))
            for f in ("token_index", "hidden", "logits")
        )
        # gather_routes itself refuses TP peers that disagree on any (token, layer).
        canonical = gather_routes(routes, group=tp_group)
        matches_reference = canonical is None or torch.equal(
            canonical.indices, ref_routes["routes"][dp_rank].indices
        )
        return dict(same_on_tp_peers=same_on_tp_peers, matches_reference=matches_reference)


def _reference_rollout():
    """Single-rank predict_record with non-zero predictors (the routes they change)."""
    from par_util import build_pr2_gpt, full_tensors, run_schedule, set_predictors

    from megatron_pr2 import routing

    torch.manual_seed(3)
    model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ, cache_tokens_per_sequence=4)
    with torch.no_grad(), routing(model, "record") as plain:
        run_schedule(model, _step_data(0), SEQ, MBS, forward_only=True)
    set_predictors(model)
    for chunk in model:
        chunk.eval()
    with torch.no_grad(), routing(model, "predict_record") as handle:
        run_schedule(model, _step_data(0), SEQ, MBS, forward_only=True)
    routes = handle.routes_per_microbatch
    changed = sum(
        int((a.indices != b.indices).any(-1).sum())
        for a, b in zip(routes, plain.routes_per_microbatch)
    )
    return dict(weights=full_tensors(model), routes=routes, predictor_changed_routes=changed)


def _rank_predictor_replicas():
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    with init_megatron_parallel():
        refs = {cache: _reference_training(cache) for cache in (4, 1)}
        rollout = _reference_rollout()
    results = {f"cache{cache}": _parallel_training(refs[cache], cache) for cache in (4, 1)}
    results["rollout"] = _tp_rollout_routes(rollout)
    results["rollout"]["predictor_changed_routes"] = rollout["predictor_changed_routes"]
    return results


@pytest.fixture(scope="module")
def replicas():
    return run_distributed(_rank_predictor_replicas, 4)


@pytest.mark.parametrize("cache", ["cache4", "cache1"])
def test_predictor_replicas_stay_identical_and_match_reference(replicas, cache):
    for rank, result in enumerate(replicas):
        r = result[cache]
        assert r["predictor_tagged_sequence_parallel"], rank
        assert r["weights_identical_on_all_ranks"], rank
        # The first record precedes any predictor update: it must match the reference exactly
        # (later ones follow the predictor, which the reference-gradient test checks).
        assert r["steps"][0]["record_ok"], rank
        for step in r["steps"]:
            assert step["grads_identical_on_all_ranks"], (rank, step)
            assert step["router_grads_nonzero"], (rank, step)
            if step["ministep"] == 1:
                assert step["grads_all_zero"], (rank, step)
        assert r["predictor_moved"] > 0, rank  # the predictor really trained


@pytest.mark.parametrize("cache", ["cache4", "cache1"])
def test_predictor_gradients_equal_single_process_reference(replicas, cache):
    if cache == "cache1":
        # The second SP shard of every sequence caches no token: its predictor loss is absent.
        assert {s["cached_here"] for r in replicas for s in r[cache]["steps"]} >= {0}
    for rank, result in enumerate(replicas):
        for step in result[cache]["steps"]:
            assert step["record_ok"], (rank, step)
            assert step["grad_err"] <= TOL * max(step["grad_scale"], 1e-12), (rank, step)
        r = result[cache]
        assert r["final_predictor_err"] <= TOL * max(1.0, r["predictor_moved"]), (rank, r)


def test_predicted_routes_identical_on_tp_ranks_without_sp(replicas):
    for rank, result in enumerate(replicas):
        r = result["rollout"]
        assert r["predictor_changed_routes"] > 0  # the predictor term really moved routes
        assert r["same_on_tp_peers"], rank
        assert r["matches_reference"], rank


# ---------------------------------------------------------------------------------------------
# Checkpoints: Megatron dist_checkpointing round trip, same layout and resharded
# ---------------------------------------------------------------------------------------------
LOAD_LAYOUTS = {"same_tp2sp": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}


def _router_and_predictor_errors(model, full):
    from par_util import compare_to_full

    errors = compare_to_full(model, full, "data")
    return {k: v for k, v in errors.items() if ".router." in k}


def _rank_checkpoint(ckpt_dir):
    from par_util import cpu_patches

    cpu_patches()  # before the first megatron-core import of this rank
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from par_util import build_pr2_gpt, drift_routers, full_tensors, load_full, set_predictors

    with init_megatron_parallel():
        torch.manual_seed(3)
        reference = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ)
        set_predictors(reference)  # non-zero, so a load that drops them shows
        drift_routers(reference)
        weights = full_tensors(reference)

    out = {}
    with init_megatron_parallel(tp=2):
        model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ)
        load_full(model, weights)
        dist_checkpointing.save(model[0].sharded_state_dict(), ckpt_dir)
        dist.barrier()
    for name, sizes in LOAD_LAYOUTS.items():
        with init_megatron_parallel(**sizes):
            torch.manual_seed(1000 + dist.get_rank())
            fresh = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ)
            before = _router_and_predictor_errors(fresh, weights)
            state = dist_checkpointing.load(fresh[0].sharded_state_dict(), ckpt_dir)
            fresh[0].load_state_dict(state)
            after = _router_and_predictor_errors(fresh, weights)
            out[name] = dict(
                predictor_params=sum(".predictor." in k for k in after),
                router_params=sum(k.endswith("router.weight") for k in after),
                differed_before=min(before.values()) > 0,
                max_err_after=max(after.values()),
                all_params_err=max(
                    __import__("par_util").compare_to_full(fresh, weights, "data").values()
                ),
            )
    return out


def test_predictor_checkpoint_round_trip(tmp_path):
    results = run_distributed(_rank_checkpoint, 2, str(tmp_path))
    for rank, result in enumerate(results):
        for layout, r in result.items():
            assert r["predictor_params"] >= 1 and r["router_params"] >= 1, (rank, layout, r)
            assert r["differed_before"], (rank, layout, r)
            assert r["max_err_after"] == 0.0, (rank, layout, r)  # exact
            assert r["all_params_err"] == 0.0, (rank, layout, r)


def _rank_lookahead_checkpoint(ckpt_dir):
    from par_util import cpu_patches

    cpu_patches()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from par_util import build_pr2_gpt

    from megatron_pr2 import pr2_routers, routing

    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(SEQ).expand(MBS, SEQ)

    def predict_record(model):
        with torch.no_grad(), routing(model, "predict_record") as handle:
            model[0](tokens, position_ids, None)
        return handle.routes.indices

    with init_megatron_parallel(tp=2):
        torch.manual_seed(3)
        model = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ, predictor="lookahead")
        predict_record(model)  # observes the first router weights
        with torch.no_grad():
            for router in pr2_routers(model):
                router.weight.add_(torch.randn(router.weight.shape) * 0.05)  # a policy update
        routes = predict_record(model)
        routers = pr2_routers(model)
        buffers = [{k: v.clone() for k, v in r.predictor.state_dict().items()} for r in routers]
        assert all(bool(r.predictor.weight.abs().sum() > 0) for r in routers)
        dist_checkpointing.save(model[0].sharded_state_dict(), ckpt_dir)
        dist.barrier()
        torch.manual_seed(3)
        fresh = build_pr2_gpt(tiny_gpt_config(), VOCAB, SEQ, predictor="lookahead")
        with torch.no_grad():
            for mine, theirs in zip(pr2_routers(fresh), routers):
                mine.weight.copy_(theirs.weight)  # same policy; only the lookahead state differs
        state = dist_checkpointing.load(fresh[0].sharded_state_dict(), ckpt_dir)
        fresh[0].load_state_dict(state)
        restored = [r.predictor.state_dict() for r in pr2_routers(fresh)]
        return {
            "buffers_exact": all(
                torch.equal(a[k], b[k]) for a, b in zip(buffers, restored) for k in a
            ),
            "buffer_names": sorted(buffers[0]),
            "same_routes": torch.equal(predict_record(fresh), routes),
        }


def test_lookahead_state_checkpoint_round_trip(tmp_path):
    # The parameter-free lookahead predictor keeps its state in buffers (anchor, drift, seen):
    # they go through Megatron's sharded_state_dict and a resumed model predicts the same routes.
    for result in run_distributed(_rank_lookahead_checkpoint, 2, str(tmp_path)):
        assert result["buffer_names"] == ["anchor", "seen", "weight"]
        assert result["buffers_exact"] and result["same_routes"], result
