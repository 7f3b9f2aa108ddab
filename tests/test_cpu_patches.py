# Tests of the CPU/gloo patch set (megatron_pr2.cpu) and of the multi-rank harness itself.
#
# In-process tests apply and then remove the patches (fixture), so the pytest process is left as
# it was. Multi-rank tests spawn gloo ranks through tests/harness.py.

import sys
import time
from typing import Iterator, Tuple

import pytest
import torch
from harness import DistributedTestError, run_distributed

from megatron_pr2 import cpu


@pytest.fixture
def unpatched() -> Iterator[None]:
    cpu._remove_cpu_patches()
    yield
    cpu._remove_cpu_patches()


def test_noop_when_cuda_is_available(unpatched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu.apply_cpu_patches()
    assert not cpu.cpu_patches_applied()
    assert cpu._PATCHES == []
    router = sys.modules.get("megatron.core.transformer.moe.router")
    if router is not None:  # imported by an earlier test: must still see the real torch
        assert router.torch is torch


def test_apply_is_idempotent_and_removable(unpatched: None) -> None:
    cpu.apply_cpu_patches()
    assert cpu.cpu_patches_applied()
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    patched = list(cpu._PATCHES)
    proxy = router.torch
    assert isinstance(proxy, cpu._CpuTorch) and mappings.torch is proxy
    assert random._get_cuda_rng_state is cpu._cpu_get_cuda_rng_state
    assert token_dispatcher.maybe_move_tensor_to_cpu is cpu._cpu_maybe_move_tensor_to_cpu

    cpu.apply_cpu_patches()  # second call changes nothing
    assert cpu._PATCHES == patched and router.torch is proxy

    cpu._remove_cpu_patches()
    assert not cpu.cpu_patches_applied()
    assert router.torch is torch and mappings.torch is torch
    assert random._get_cuda_rng_state is not cpu._cpu_get_cuda_rng_state
    assert moe_utils.maybe_move_tensor_to_cpu is not cpu._cpu_maybe_move_tensor_to_cpu


def test_cpu_torch_view(unpatched: None) -> None:
    view = cpu._CpuTorch()
    assert view.cuda.current_device() == torch.device("cpu")
    assert view.zeros(2, device="cuda").device.type == "cpu"
    assert view.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert view.tensor([1, 2], device=view.cuda.current_device()).tolist() == [1, 2]
    assert view.float32 is torch.float32 and view.distributed is torch.distributed
    stream = view.cuda.Stream()
    with view.cuda.stream(stream):
        stream.wait_stream(view.cuda.current_stream())
    stream.record_event().synchronize()
    # The "CUDA" RNG is the CPU generator: saving and restoring it replays CPU draws.
    state = view.cuda.get_rng_state()
    first = torch.rand(3)
    cpu._cpu_set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    splits = cpu._cpu_maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)


# ---------------------------------------------------------------------------------------------
# Multi-rank: removing the patches fails loudly; harness failure and timeout reporting.
# ---------------------------------------------------------------------------------------------
def _moe_forward_without_patches() -> None:
    from harness import build_moe_layer, make_moe_config

    cpu.apply_cpu_patches()
    cpu._remove_cpu_patches()  # the 0.19 triton preload stays: megatron.core imports
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1)
    layer = build_moe_layer(make_moe_config())
    layer(torch.randn(8, 1, 64))


def test_multi_rank_moe_without_patches_fails_with_clear_message() -> None:
    with pytest.raises(DistributedTestError) as error:
        run_distributed(_moe_forward_without_patches, 2)
    message = str(error.value)
    assert "CUDA-only code path" in message and "apply_cpu_patches()" in message, message
    assert "----- rank 0 (error)" in message and "----- rank 1 (error)" in message, message
    assert "TIMEOUT" not in message, message


def _rank_and_world() -> Tuple[int, int]:
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _rank_one_raises_rank_zero_waits() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    torch.distributed.barrier()  # would wait for rank 1 forever


def _sleep_forever() -> None:
    time.sleep(3600)


def test_harness_returns_per_rank_results() -> None:
    assert run_distributed(_rank_and_world, 2) == [(0, 2), (1, 2)]


def test_harness_reports_failing_rank_and_does_not_hang() -> None:
    # Reported as rank 1's error, long before the launch timeout (no wall-clock bound here:
    # start-up alone can take minutes on a loaded machine).
    with pytest.raises(DistributedTestError) as error:
        run_distributed(_rank_one_raises_rank_zero_waits, 2)
    message = str(error.value)
    assert "ValueError: deliberate failure on rank 1" in message, message
    assert "----- rank 1 (error)" in message
    assert "TIMEOUT" not in message, message


def test_harness_times_out_hung_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="TIMEOUT after 10"):
        run_distributed(_sleep_forever, 2, timeout=10)
    assert time.monotonic() - start < 45
