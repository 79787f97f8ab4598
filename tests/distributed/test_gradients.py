"""Gradients through the sequence-parallel layers in real gloo groups of 2 and 4 processes,
every (U, R) layout, against fp64 autograd of full attention (see grad_cases.py)."""

from __future__ import annotations

import functools

import pytest

from tests.distributed import grad_cases, sp_cases
from tests.helpers.multiproc import runs_per_world
from tests.helpers.state import reset_usp_attn_state

WORLD_SIZES = (2, 4)
PER_LAYOUT = (
    grad_cases.full_loss_on_every_rank,
    grad_cases.cross_attention_grads,
    grad_cases.grads_without_autograd_unchanged,
    grad_cases.saved_activations_are_local,
    grad_cases.dit_training_step,
    grad_cases.double_backward_is_an_error,
    grad_cases.empty_shard_and_empty_batch_backward,
)


def _cases(world: int) -> list:
    cases = []
    for u, r in sp_cases.layouts(world):
        cases += [functools.partial(grad_cases.run_grad_scenario, u, r, name) for name in grad_cases.SCENARIOS]
        cases += [functools.partial(fn, u, r) for fn in PER_LAYOUT]
        cases += [functools.partial(grad_cases.gradcheck_layout, u, r, name) for name in grad_cases.GRADCHECK_CASES]
    if world == 2:
        cases.append(grad_cases.training_benchmark_dry_run)
    cases.append(functools.partial(grad_cases.sage_without_backward_is_an_error, world // 2, 2))  # last: re-inits
    return cases


_run = runs_per_world(_cases, setup=reset_usp_attn_state, timeout=300)


def _layout_params(names):
    for world in WORLD_SIZES:
        for u, r in sp_cases.layouts(world):
            if u * r != world or world == 1:
                continue
            for name in names:
                yield pytest.param(world, u, r, name, id=f"W{world}-U{u}xR{r}-{name}",
                                   marks=[pytest.mark.xdist_group(f"grad_world{world}"),
                                          *([pytest.mark.slow] if world >= 4 else [])])  # 4 ranks: full lane


@pytest.mark.parametrize("world,u,r,name", list(_layout_params(grad_cases.SCENARIOS)))
def test_gradients_match_fp64_autograd(world, u, r, name):
    results = _run(world).check(functools.partial(grad_cases.run_grad_scenario, u, r, name))
    for rank, res in enumerate(results):
        assert max(res["errors"].values()) <= grad_cases.GRAD_RTOL, (rank, res["errors"])
    # Replicated tokens' gradients: the same bits on every rank.
    assert all(res["replicated"] == results[0]["replicated"] for res in results)


@pytest.mark.parametrize("world,u,r,name", list(_layout_params([fn.__name__ for fn in PER_LAYOUT])))
def test_gradient_properties(world, u, r, name):
    _run(world).check(functools.partial(getattr(grad_cases, name), u, r))


@pytest.mark.parametrize("world,u,r,name", list(_layout_params(grad_cases.GRADCHECK_CASES)))
def test_gradcheck_fp64(world, u, r, name):
    assert all(_run(world).check(functools.partial(grad_cases.gradcheck_layout, u, r, name)))


@pytest.mark.parametrize(
    "world", [pytest.param(w, marks=[pytest.mark.xdist_group(f"grad_world{w}"),
                                     *([pytest.mark.slow] if w >= 4 else [])])
              for w in WORLD_SIZES]
)
def test_backend_without_backward_is_an_error_on_every_rank(world):
    messages = _run(world).check(functools.partial(grad_cases.sage_without_backward_is_an_error, world // 2, 2))
    assert len(set(messages)) == 1, messages
    assert "'sage_attn' has no backward kernel" in messages[0] and "torch_sdpa" in messages[0], messages[0]


@pytest.mark.xdist_group("grad_world2")
def test_training_benchmark_step_rows_dry_run():
    rows = _run(2).check(grad_cases.training_benchmark_dry_run)[0]
    assert rows[0]["speedup_vs_1gpu"] == 1.0
