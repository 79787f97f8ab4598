"""FlashAttention 4's launch bound once per call signature (usp_attn/backends/flash_bind.py) with the real
package: the bound launch is bound at all (FA4's internals are as the module knows them), gives exactly
what the public function gives (same kernel: bit for bit), and replays from a CUDA graph.
``pytest -m gpu tests/gpu/test_gpu_flash_bind.py``; skipped without FA4."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import GPU, make_qkv
from tests.gpu.graph_cases import capture, replays_vs_eager
from usp_attn import AttentionBackendEnum as B
from usp_attn.backends import flash_bind, make_backend
from usp_attn.platforms import current_platform

pytestmark = GPU


def _fa4():
    from usp_attn.backends.flash import FlashAttentionBackend, flash_generations

    reason = FlashAttentionBackend.machine_reason(current_platform())
    if reason or "fa4" not in flash_generations(current_platform()):
        pytest.skip(reason or "FlashAttention 4 (flash_attn.cute) is not installed")
    import flash_attn.cute as cute

    return make_backend(B.FA, current_platform(), "fa4"), cute.flash_attn_func


@pytest.mark.parametrize("shape", [(1, 4608, 24, 128), (1, 4608, 3, 128), (2, 1000, 8, 64)],
                         ids=["flux", "flux-ulysses8-rank", "odd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("h_kv", [None, 1], ids=["mha", "mqa"])
def test_bound_launch_equals_the_public_function(shape, causal, return_lse, h_kv):
    fa, public = _fa4()
    b, s, h, d = shape
    for seed in range(3):
        q, k, v = make_qkv(b, s, h, d, torch.bfloat16, h_kv=h_kv, seed=seed)
        got = fa.forward(q, k, v, causal=causal, return_lse=return_lse)
        want = public(q, k, v, causal=causal, return_lse=return_lse)
        got = got if return_lse else (got, None)
        assert torch.equal(got[0], want[0])
        if return_lse:
            assert torch.equal(got[1], want[1])
    bound, public_only = flash_bind.bound_signatures()
    assert bound >= 1 and public_only == 0, (
        "FA4's launch was not bound: its internals differ from what usp_attn/backends/flash_bind.py knows")


def test_bound_launch_replays_from_a_cuda_graph():
    fa, _ = _fa4()

    def values(seed):
        return list(make_qkv(1, 4608, 3, 128, torch.bfloat16, seed=seed))

    def call(q, k, v):
        return fa.forward(q, k, v, return_lse=True)

    static = values(0)
    call(*static)
    call(*static)  # bound from here on
    graph, out = capture(call, *static)
    assert replays_vs_eager(graph, out, static, call, values) == "equal"
