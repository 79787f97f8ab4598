"""The measured automatic kernel choice, on injected Hopper platforms with kernel stand-ins and a
deterministic timer (the real timer needs CUDA events): which kernels are timed, that the fastest
wins and is cached per shape class, and when measuring is skipped."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.helpers import fake_kernels
from tests.helpers.reference import reference_attention
from usp_attn import AttentionBackendEnum as B
from usp_attn import LocalAttention, global_force_attn_backend, measured_choice
from usp_attn.platforms import Platform, override_platform
from usp_attn.measured_choice import Candidate, ShapeClass, exact_candidates, length_bucket

BF16 = torch.bfloat16
HOPPER_FA4 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute"], device_name="H200")
HOPPER_FA4_FA3 = Platform.make("cuda", capability=(9, 0), packages=["flash_attn.cute", "flash_attn_interface"])


class FakeTimer(measured_choice.KernelTimer):
    """Deterministic "GPU": each kernel takes the milliseconds in ``table``; calls are really made."""

    def __init__(self, table, fail=()):
        self.table, self.fail = table, set(fail)
        self.timed = []  # kernel names, one per timed call
        self.warmed = []

    def usable(self, q):
        return True

    def warm_up(self, candidate, call, device):
        self.warmed.append(candidate.kernel)
        if candidate.kernel in self.fail:
            raise RuntimeError(f"{candidate.kernel} cannot run this shape")
        call()

    def time(self, candidate, call, device):
        call()
        self.timed.append(candidate.kernel)
        return self.table[candidate.kernel]


@pytest.fixture
def timer(monkeypatch):
    installed = {}

    def install(table, fail=()):
        t = FakeTimer(table, fail)
        previous = measured_choice.set_timer(t)
        installed.setdefault("previous", previous)
        return t

    yield install
    if "previous" in installed:
        measured_choice.set_timer(installed["previous"])
    measured_choice.set_kernel_choice()
    measured_choice.clear_measurements()


@pytest.fixture(autouse=True)
def fresh():
    measured_choice.clear_measurements()
    yield
    measured_choice.clear_measurements()


def qkv(s=40, h=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, h, d, generator=g).to(BF16) for _ in range(3)]


def run(layer, s=40):
    q, k, v = qkv(s, layer.num_heads, layer.head_size)
    out = layer(q, k, v)
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)  # every winner computes attention
    return layer._last


def test_length_bucket():
    assert [length_bucket(n) for n in (1, 2, 3, 4096, 4097, 4608, 32760)] == [1, 2, 4, 4096, 8192, 8192, 32768]


def test_candidates_are_the_exact_kernels_every_platform_has():
    cands = exact_candidates([HOPPER_FA4_FA3], 128, BF16, need_lse=False)
    assert [c.kernel for c in cands] == ["fa4", "fa3", "cudnn", "flash", "efficient"]
    # common to all ranks only; sage never (lossy)
    sage = Platform.make("cuda", capability=(9, 0), packages=["flash_attn_interface", "sageattention"])
    cands = exact_candidates([HOPPER_FA4_FA3, sage], 128, BF16, need_lse=True)
    assert [c.kernel for c in cands] == ["fa3", "cudnn", "flash", "efficient"]
    only_sdpa = exact_candidates([HOPPER_FA4], 128, BF16, need_lse=False, allowed=lambda b: b is B.TORCH_SDPA)
    assert {c.backend for c in only_sdpa} == {B.TORCH_SDPA}
    assert exact_candidates([Platform.make("cpu")], 128, BF16, need_lse=False) == ()


@pytest.mark.parametrize("table,winner,backend", [
    ({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0}, "fa4", B.FA),
    ({"fa4": 2.0, "cudnn": 1.5, "flash": 3.0, "efficient": 4.0}, "cudnn", B.TORCH_SDPA),
    ({"fa4": 2.0, "cudnn": 1.5, "flash": 3.0, "efficient": 0.5}, "efficient", B.TORCH_SDPA),
])
def test_the_fastest_kernel_wins_and_is_bound(monkeypatch, timer, table, winner, backend):
    fake = fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    t = timer(table)
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        sel = run(layer)
        assert layer.kernel_for(*qkv(40, 4, 64))[1].kernel == winner  # the bound kernel object
    assert sel.source == "measured" and sel.backend is backend and sel.kernel == winner
    assert [k for k, _ in sel.timings] == sorted(table, key=table.get)
    assert dict(sel.timings) == table
    assert sorted(t.warmed) == sorted(table)
    best = min(table.values())
    for kernel, ms in table.items():  # close contenders get MIN_ROUNDS; a kernel 1.5x slower only one round
        count = t.timed.count(kernel)
        assert count == 1 if ms > measured_choice.PRUNE_FACTOR * best else count >= measured_choice.MIN_ROUNDS
    assert len(fake.calls) >= 2  # FA4 really ran (warm-up + a round)


def test_rounds_rotate_the_order(monkeypatch, timer):
    """Each round starts with another kernel, so within-round clock drift does not favour one."""
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    t = timer({"fa4": 1.0, "cudnn": 1.1, "flash": 1.2, "efficient": 1.3})  # all within 1.5x: none dropped
    with override_platform(HOPPER_FA4):
        run(LocalAttention(4, 64))
    rounds = [t.timed[i:i + 4] for i in range(0, len(t.timed), 4)]
    assert len(rounds) >= 3 and all(sorted(r) == sorted(rounds[0]) for r in rounds)
    assert len({r[0] for r in rounds[:4]}) == min(4, len(rounds))


def test_measured_once_per_shape_class(monkeypatch, timer):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    t = timer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        run(layer, s=40)
        timed = len(t.timed)
        run(layer, s=40)
        run(layer, s=33)  # same bucket (64): no new measurement
        assert len(t.timed) == timed
        other = LocalAttention(4, 64)  # another layer, same class: the process cache answers
        run(other, s=50)
        assert len(t.timed) == timed
        run(layer, s=70)  # a new bucket (128): measured again
        assert len(t.timed) > timed
        timed = len(t.timed)
        causal = LocalAttention(4, 64, causal=True)
        run_causal = causal(*qkv(40, 4, 64))
        assert len(t.timed) > timed and run_causal.shape == (1, 40, 4, 64)


def test_a_kernel_that_fails_is_not_chosen(monkeypatch, timer, caplog):
    caplog.set_level(logging.INFO, logger="usp_attn")
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    timer({"fa4": 0.1, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0}, fail={"fa4"})
    with override_platform(HOPPER_FA4):
        sel = run(LocalAttention(4, 64))
    assert sel.kernel == "cudnn" and ("fa4", None) in sel.timings
    assert any("fa4 could not run" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("why", ["static", "request", "mask", "plain tensors on cpu"])
def test_when_nothing_is_measured(monkeypatch, timer, why):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    t = timer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    if why == "plain tensors on cpu":
        measured_choice.set_timer(measured_choice.CudaEventTimer())  # the real timer: CUDA only
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        q, k, v = qkv(40, 4, 64)
        if why == "static":
            measured_choice.set_kernel_choice("static")
        if why == "request":
            global_force_attn_backend("torch_sdpa")
        try:
            if why == "mask":
                layer(q, k, v, attn_mask=torch.ones(1, 40, dtype=torch.bool))
            else:
                layer(q, k, v)
        finally:
            global_force_attn_backend(None)
    assert t.timed == [] and layer._last.source != "measured" and layer._last.timings == ()


def test_static_rule_uses_the_number_of_keys(monkeypatch, timer):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    measured_choice.set_kernel_choice("static")
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        assert run(layer, s=40).backend is B.TORCH_SDPA  # few keys: cuDNN


def test_settings_validate():
    with pytest.raises(ValueError, match="'measure' or 'static'"):
        measured_choice.set_kernel_choice("fastest")


def test_cache_file_skips_the_second_measurement(monkeypatch, timer, tmp_path):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    path = tmp_path / "sub" / "kernels.json"
    measured_choice.set_kernel_choice("measure", cache_path=path)
    t = timer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    with override_platform(HOPPER_FA4):
        first = run(LocalAttention(4, 64))
        assert first.source == "measured" and path.exists()
        (entries,) = json.loads(path.read_text())["machines"].values()  # one machine fingerprint
        (entry,) = entries.values()
        assert entry["winner"] == "fa4"
        measured_choice.clear_measurements()  # a new process, as far as the cache is concerned
        timed = len(t.timed)
        second = run(LocalAttention(4, 64))
        assert len(t.timed) == timed and second.kernel == "fa4" and second.timings == first.timings
        # another machine (other package versions) does not reuse it
        measured_choice.clear_measurements()
    other = Platform.make("cuda", capability=(9, 0), packages={"flash_attn.cute": "4.0.1"}, device_name="H200")
    with override_platform(other):
        run(LocalAttention(4, 64))
        assert len(t.timed) > timed


def test_unreadable_cache_file_is_ignored(monkeypatch, timer, tmp_path, caplog):
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    path = tmp_path / "kernels.json"
    path.write_text("{not json")
    measured_choice.set_kernel_choice("measure", cache_path=path)
    timer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    with override_platform(HOPPER_FA4):
        assert run(LocalAttention(4, 64)).kernel == "fa4"
    assert "ignoring unreadable kernel cache file" in caplog.text
    assert path.read_text() == "{not json"  # not a cache usp_attn wrote: never overwritten


def test_shape_class_describes_itself():
    shape = ShapeClass.of(BF16, 128, 40, 8, 32760, 4000, True, True)
    assert shape.describe() == "bfloat16 D=128 H=40 H_kv=8 S_q<=32768 S_k<=4096 causal lse"
    assert Candidate(B.FA, "fa4") == Candidate(B.FA, "fa4")


def test_training_measures_only_kernels_with_a_backward(monkeypatch, timer):
    """FA4 has no backward kernel on SM80: with gradients required it is not a candidate there."""
    ampere = Platform.make("cuda", capability=(8, 0), packages=["flash_attn.cute"])
    assert [c.kernel for c in exact_candidates([ampere], 64, BF16, need_lse=False)] == ["fa4", "flash", "efficient"]
    assert [c.kernel for c in exact_candidates([ampere], 64, BF16, need_lse=False, need_backward=True)] == [
        "flash", "efficient"]
    fake_kernels.install(monkeypatch, fake_kernels.fake_flash_attn4())
    t = timer({"fa4": 1.0, "cudnn": 2.0, "flash": 3.0, "efficient": 4.0})
    with override_platform(HOPPER_FA4):
        layer = LocalAttention(4, 64)
        q, k, v = (x.requires_grad_() for x in qkv(40, 4, 64))
        with torch.no_grad():
            layer(q, k, v)
        inference = len(t.timed)
        layer(q, k, v)  # gradients required: another shape class, measured again
        assert len(t.timed) > inference and layer._last.timings and "backward" not in str(layer._last.kernel)
