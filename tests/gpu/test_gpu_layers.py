"""The layers on one GPU: USPAttention at world size 1, no host syncs, torch.compile(fullgraph=True).

World size 1 is all one GPU can host (NCCL refuses two ranks on one device); the
multi-rank paths run in tests/distributed on gloo and in test_multigpu.py on several GPUs.
One rank's ring compute path runs here with the in-memory exchange of benchmarks/local_ring.py.
Bounds: tests/gpu/common.py.
"""

from __future__ import annotations

import pytest
import torch

import usp_attn
from benchmarks.local_ring import run_local_ring, split_blocks
from tests.gpu.common import BF16, GPU, REL_TOL, key_padding_mask, make_qkv, rel_err
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum, LocalAttention, USPAttention, global_force_attn_backend_context_manager
from usp_attn.backends import BACKEND_CLASSES
from usp_attn.platforms import current_platform

pytestmark = GPU

B, S, H, D = 1, 2048, 12, 128


@pytest.fixture
def world_one():
    """A real 1-rank sequence-parallel group (NCCL on this GPU), torn down afterwards."""
    state = usp_attn.init_sequence_parallel(1, 1)
    try:
        yield state
    finally:
        usp_attn.destroy_sequence_parallel()


def test_usp_world_one_matches_local_and_fp64(world_one):
    q, k, v = make_qkv(B, S, H, D, BF16, seed=21)
    usp, local = USPAttention(H, D), LocalAttention(H, D)
    out = usp(q, k, v)
    assert world_one.world_size == 1
    assert torch.equal(out, local(q, k, v))  # world size 1 is exactly the local layer
    assert rel_err(out, reference_attention(q, k, v)) < REL_TOL[BF16]


def test_usp_world_one_with_replicated_prefix_and_mask(world_one):
    n_text = 77
    q, k, v = make_qkv(B, S + n_text, H, D, BF16, seed=22)
    mask = key_padding_mask(B, S + n_text)
    out = USPAttention(H, D)(q, k, v, attn_mask=mask, num_replicated_prefix=n_text)
    assert rel_err(out, reference_attention(q, k, v, mask=mask)) < REL_TOL[BF16]


# ---- no host synchronisation in a steady-state forward ------------------------------------------------
def _local(q, k, v):
    layer = LocalAttention(H, D)
    return lambda: layer(q, k, v)


def _local_lse(q, k, v):
    layer = LocalAttention(H, D)
    return lambda: layer.attend(q, k, v, return_lse=True)


def _local_masked(q, k, v):
    layer, mask = LocalAttention(H, D), key_padding_mask(B, k.shape[1])
    return lambda: layer(q, k, v, attn_mask=mask)


def _usp(q, k, v):
    layer = USPAttention(H, D)
    return lambda: layer(q, k, v)


def _ring4(q, k, v):
    """One ring rank's compute path (4 blocks, LSE merges), the blocks handed over from memory."""
    layer = LocalAttention(H, D)
    blocks, lengths = split_blocks(k, v, 4)
    return lambda: run_local_ring(layer.attend, q, blocks, lengths)


def _sage(q, k, v):
    reason = BACKEND_CLASSES[AttentionBackendEnum.SAGE_ATTN].unsupported_reason(current_platform(), D, BF16)
    if reason:
        pytest.skip(f"sage_attn cannot run here: {reason}")
    layer = LocalAttention(H, D)

    def call():
        with global_force_attn_backend_context_manager(AttentionBackendEnum.SAGE_ATTN):
            return layer(q, k, v)

    return call


SYNC_CASES = {"LocalAttention": _local, "LocalAttention.attend(return_lse=True)": _local_lse,
              "LocalAttention, key-padding mask": _local_masked, "USPAttention world 1": _usp,
              "ring_attention R=4 (in-memory exchange)": _ring4, "LocalAttention[sage_attn]": _sage}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_forward_has_no_host_sync(world_one, case):
    q, k, v = make_qkv(B, S, H, D, BF16, seed=23)
    call = SYNC_CASES[case](q, k, v)
    call()  # warm-up: the first call may sync (selection, cuDNN plans, allocator growth)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()  # raises RuntimeError on any synchronising CUDA call
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---- torch.compile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_cls", [LocalAttention, USPAttention], ids=lambda c: c.__name__)
def test_compile_fullgraph_with_torch_sdpa(world_one, layer_cls):
    torch._dynamo.reset()
    q, k, v = make_qkv(B, S, H, D, BF16, seed=24)
    q2, k2, v2 = make_qkv(B, S, H, D, BF16, seed=25)
    layer = layer_cls(H, D)
    try:
        with global_force_attn_backend_context_manager(AttentionBackendEnum.TORCH_SDPA):
            compiled = torch.compile(layer, fullgraph=True)  # a graph break raises here
            out = compiled(q, k, v)
            out2 = compiled(q2, k2, v2)  # new data, same shapes
            eager = layer(q, k, v)
    finally:
        torch._dynamo.reset()
    assert rel_err(out, reference_attention(q, k, v)) < REL_TOL[BF16]
    assert rel_err(out2, reference_attention(q2, k2, v2)) < REL_TOL[BF16]
    torch.testing.assert_close(out, eager, atol=1e-2, rtol=1e-2)


def test_compile_fullgraph_after_a_measured_first_call(world_one):
    """Automatic selection: the first eager call measures (FA4 may win: its kernels are called
    through the usp_attn::flash_attn_forward custom op under compilation), then compile."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 16384, 8, D, BF16, seed=26)
    layer = LocalAttention(8, D)
    eager = layer(q, k, v)
    try:
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(q, k, v)
    finally:
        torch._dynamo.reset()
    assert layer._last.source == "measured"
    torch.testing.assert_close(out, eager, atol=1e-2, rtol=1e-2)
