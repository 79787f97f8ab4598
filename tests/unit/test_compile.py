"""``torch.compile(fullgraph=True)`` over the layers after a first eager call (on CPU with the
``aot_eager`` backend: dynamo's tracing and the fake-tensor pass, without code generation).

FlashAttention's kernels are Python dynamo cannot trace, so under compilation the ``fa`` backend
goes through the ``usp_attn::flash_attn_forward`` custom op; the FA4 stand-in records whether it
really ran."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from tests.unit.test_measured_choice import FakeTimer
from usp_attn import LocalAttention, USPAttention, global_force_attn_backend, measured_choice
from usp_attn.platforms import Platform, override_platform

HOPPER_FA4 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute"], device_name="H200")


@pytest.fixture(autouse=True)
def clean():
    torch._dynamo.reset()
    measured_choice.clear_measurements()
    yield
    torch._dynamo.reset()
    global_force_attn_backend(None)
    measured_choice.set_timer(measured_choice.CudaEventTimer())
    measured_choice.clear_measurements()


def qkv(seed, s=24, h=4, d=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, h, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("layer_cls", [LocalAttention, USPAttention])
def test_torch_sdpa_layers_compile_without_graph_breaks(layer_cls):
    layer = layer_cls(4, 64)
    q, k, v = qkv(0)
    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), eager)
    q2, k2, v2 = qkv(1)
    torch.testing.assert_close(compiled(q2, k2, v2).double(), reference_attention(q2, k2, v2), atol=1e-5, rtol=1e-5)


def test_fa_compiles_through_the_custom_op(monkeypatch):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    with override_platform(HOPPER_FA4):
        global_force_attn_backend("fa")
        layer = LocalAttention(4, 64, causal=True)
        q, k, v = qkv(2, dtype=torch.bfloat16)
        eager = layer(q, k, v)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        calls = len(fake.calls)
        out = compiled(q, k, v)
    assert len(fake.calls) > calls  # the real kernel ran inside the compiled graph
    torch.testing.assert_close(out, eager)
    assert torch.ops.usp_attn.flash_attn_forward.default is not None


def test_measured_choice_then_compile_reuses_the_winner(monkeypatch):
    """The first eager call measures; the compiled call must use that winner without timing."""
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    timer = FakeTimer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    measured_choice.set_timer(timer)
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        q, k, v = qkv(3, dtype=torch.bfloat16)
        eager = layer(q, k, v)
        assert layer._last.kernel == "fa4"
        timed = len(timer.timed)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v)
    assert len(timer.timed) == timed
    torch.testing.assert_close(out, eager)
