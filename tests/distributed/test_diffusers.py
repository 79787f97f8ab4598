"""diffusers integration: tiny random transformers of every supported family (Wan, Flux, Qwen-Image, LTX-Video,
HunyuanVideo, CogVideoX; tests/distributed/diffusers_models.py) under sequence parallelism in real gloo groups of
2 and 4 processes, every layout (U x R = 2x1, 1x2, 4x1, 2x2, 1x4), compared with the same model, unparallelised,
on the same full inputs.

Shapes: 30 image tokens (2 x 3 x 5), so shards are uneven for 4 ranks (8/8/7/7); 5 heads on 2 ranks and 6 heads
on 4 ranks, so no Ulysses degree > 1 divides them; batch 2; 7 text tokens, padded per sample in the masked
scenarios (Qwen-Image, LTX-Video, HunyuanVideo); per-token timesteps for Wan 2.2 TI2V and LTX-Video.

Tolerance (fp32): both runs do the same fp32 operations on the same rows except attention, where only the
summation order differs (Ulysses regroups heads; the ring merges per-block softmax partials through their
log-sum-exp in fp32): a few fp32 ulps per attention output, amplified by at most O(10) through two blocks of
norms, MLPs and modulation, on outputs of O(1-6) (measured <= 2e-6 absolute, <= 3.2e-7 of the output scale).
The bound is the issue's 1e-4 of the output scale; test_tolerance_catches_attention_that_skips_other_ranks
shows that attention which misses the other ranks' keys is off by > 100x the bound, and the masked scenarios
check that ignoring the text mask would change the output by > 20x the bound (measured 67x and more).

bf16 (flux_bf16: weights and activations in bf16): each attention output is rounded to bf16 (2^-8 relative) at
points that differ between the runs, so outputs may differ by a few bf16 ulps of O(1) values: bound 2^-6 of the
output scale.

A zigzag layout recorded on the state by the user's own shard_sequence(x, load_balance=True) must not change how
the model is cut (W2: the same shard sizes in another order, so a run following it would return reordered rows;
W4 U2xR2: other sizes, so it would fail). A rank whose attention call does not fit the plan's declaration makes
every rank raise the same error at once (WRONG_CALL_BOUND_S, against a group timeout 4x as long).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed import diffusers_models as models
from tests.helpers.multiproc import runs_per_world
from tests.helpers.state import reset_usp_attn_state

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
requires_diffusers = pytest.mark.skipif(
    not HAVE_DIFFUSERS,
    reason="diffusers is not installed (optional extra; CI installs it via the 'test' extra)",
)

RTOL_OF_MAX = 1e-4
GRID = (2, 3, 5)  # 30 tokens
HEADS = {2: 5, 4: 6}  # divisible by no Ulysses degree > 1 of that world size
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2), (1, 4)]}
# scenario -> (family, inputs options)
SCENARIOS: dict[str, tuple[str, dict]] = {
    "wan": ("wan", {}),
    "wan_per_token_timestep": ("wan", {"per_token_timestep": True}),
    "flux": ("flux", {}),
    "qwen_text_mask": ("qwen", {"text_mask": True}),
    "qwen": ("qwen", {}),
    "ltx_text_mask_per_token_timestep": ("ltx", {"text_mask": True, "per_token_timestep": True}),
    "hunyuan_video": ("hunyuan_video", {}),
    "hunyuan_video_text_mask": ("hunyuan_video", {"text_mask": True}),
    "cogvideox": ("cogvideox", {}),
    "flux_bf16": ("flux", {"dtype": torch.bfloat16}),
}
BF16_RTOL_OF_MAX = 2.0**-6
# (world, U, R) x scenario run after shard_sequence(..., load_balance=True) recorded the zigzag layout
RECORDED_ZIGZAG = [(2, 1, 2), (4, 2, 2)]
RECORDED_ZIGZAG_SCENARIOS = ("flux", "qwen_text_mask")  # the audit's failure and hang at U2xR2
WRONG_CALL_TIMEOUT_S = 20.0  # SP group timeout of that case: an error that waited for it fails the bound
WRONG_CALL_BOUND_S = 5.0


# ---- run inside the spawned ranks ----------------------------------------------------------------------
def _layout(ulysses: int, ring: int):
    import usp_attn

    state = usp_attn.get_sequence_parallel_state()
    if state is not None and (state.ulysses_degree, state.ring_degree) == (ulysses, ring):
        return state
    usp_attn.destroy_sequence_parallel()
    return usp_attn.init_sequence_parallel(ulysses, ring)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run_scenario(ulysses: int, ring: int, name: str, recorded_zigzag: bool = False) -> dict:
    import usp_attn
    from usp_attn.distributed.state import shard_sizes
    from usp_attn.integrations.diffusers import (
        disable_sequence_parallel, enable_sequence_parallel, is_sequence_parallel_enabled,
    )

    family, options = SCENARIOS[name]
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    state = _layout(ulysses, ring)
    model = models.build(family, HEADS[state.world_size]).to(dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in models.inputs(family, GRID, batch=2, **options).items()}
    original = dict(model.attn_processors)
    hooks_before = _hook_count(model)
    with torch.no_grad():
        reference = model(**inputs)[0]
        mask_effect = None
        if options.get("text_mask"):
            unmasked = models.inputs(family, GRID, batch=2, **dict(options, text_mask=False))
            mask_effect = (model(**unmasked)[0] - reference).abs().max().item()

    enable_sequence_parallel(model)
    seen = []  # image-token rows the first block gets on this rank (probe registered after our hooks)
    probe = models.first_block(model, family).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(models.first_block_tokens(family, args, kwargs)), with_kwargs=True)
    assert is_sequence_parallel_enabled(model)
    if recorded_zigzag:  # the user's own tensor of another length, in the zigzag layout
        usp_attn.shard_sequence(torch.zeros(1, 12), load_balance=True)
    with torch.no_grad():
        out = model(**inputs)[0]
        # Another instance of the same family, not enabled, is untouched while this one is enabled.
        bystander = models.build(family, HEADS[state.world_size]).to(dtype)(**inputs)[0]
    state.set_load_balance(False)
    state.set_sequence_length(None)
    probe.remove()
    disable_sequence_parallel(model)
    with torch.no_grad():
        restored = model(**inputs)[0]
    tokens = models.token_count(family, GRID)
    return dict(
        out=out, error=(out.float() - reference.float()).abs().max().item(), scale=reference.float().abs().max().item(),
        mask_effect=mask_effect, local_tokens=seen, tokens=tokens,
        expected_local=shard_sizes(tokens, state.world_size)[state.sp_rank],
        bystander_equal=torch.equal(bystander, reference), restored_equal=torch.equal(restored, reference),
        processors_restored=all(model.attn_processors[k] is v for k, v in original.items()),
        hooks_left=_hook_count(model) - hooks_before, enabled_after_disable=is_sequence_parallel_enabled(model),
    )


def bad_inputs_fail_on_every_rank(ulysses: int, ring: int) -> list[str]:
    """Too few tokens: the same clear error on every rank, and the model still works after."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    state = _layout(ulysses, ring)
    model = enable_sequence_parallel(models.build("flux", 2))
    messages = []
    try:
        with torch.no_grad():
            model(**models.inputs("flux", (1, 1, state.world_size - 1)))
    except ValueError as exc:
        messages.append(str(exc))
    with torch.no_grad():
        out = model(**models.inputs("flux", GRID))[0]  # the failed call left no half-finished state behind
    assert out.shape == (1, 30, 8), out.shape
    return messages


def local_only_attention_is_caught(ulysses: int, ring: int) -> dict:
    """Sensitivity of the tolerance: joint attention that sees only this rank's image keys must fail it."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel
    from usp_attn.layers.usp import USPAttention

    _layout(ulysses, ring)
    model, inputs = models.build("flux", 5), models.inputs("flux", GRID, batch=2)
    with torch.no_grad():
        reference = model(**inputs)[0]
    enable_sequence_parallel(model)
    run = model._usp_attn_sequence_parallel

    def shard_only(heads, kv_heads, head_size, scale, causal, cross):
        layer = USPAttention(heads, head_size, num_kv_heads=kv_heads, softmax_scale=scale)  # single-rank layer
        return lambda q, k, v, mask=None, **_: layer.local(q, k, v, mask)

    run.router.layer = shard_only
    with torch.no_grad():
        out = model(**inputs)[0]
    return dict(error=(out - reference).abs().max().item(), scale=reference.abs().max().item())


def unroutable_processor_is_refused(ulysses: int, ring: int) -> str:
    """A processor that computes attention itself (not through dispatch_attention_fn) is refused at enable."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel, is_sequence_parallel_enabled

    _layout(ulysses, ring)
    model = models.build("flux", 2)
    attn = model.transformer_blocks[0].attn
    attn.set_processor(_SelfContainedProcessor())
    hooks = _hook_count(model)
    try:
        enable_sequence_parallel(model)
    except TypeError as exc:
        assert not is_sequence_parallel_enabled(model) and _hook_count(model) == hooks
        return str(exc)
    raise AssertionError("a processor without dispatch_attention_fn was accepted")


def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        with torch.no_grad():
            fn()
    except Exception as exc:  # noqa: BLE001 - the test asserts type and message
        return {"type": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


def _without_text(module, args, kwargs):
    """Call a cross-attention module without its encoder_hidden_states (it then attends its own tokens)."""
    if len(args) > 1:
        args = (args[0], None, *args[2:])
    kwargs.pop("encoder_hidden_states", None)
    return args, kwargs


def wrong_call_on_one_rank(ulysses: int, ring: int) -> dict:
    """Rank 1 alone gets an attention call that does not fit the plan's declaration: Wan's cross-attention without
    its text, then Flux under a plan declaring its joint attention as cross-attention. Also: a plan that leaves a
    routed attention module undeclared is refused at enable."""
    import torch.distributed as dist

    import usp_attn
    from usp_attn.integrations.diffusers import enable_sequence_parallel
    from usp_attn.integrations.diffusers.families import BUILTIN_PLANS, plan_for_model

    usp_attn.destroy_sequence_parallel()
    state = usp_attn.init_sequence_parallel(ulysses, ring, timeout=WRONG_CALL_TIMEOUT_S)
    alone = state.sp_rank == 1
    results = {}
    wan, inputs = models.build("wan", HEADS[2]), models.inputs("wan", GRID)
    enable_sequence_parallel(wan)
    if alone:  # prepended: the run's own hook sees the call as it reaches the module
        hook = wan.blocks[0].attn2.register_forward_pre_hook(_without_text, with_kwargs=True, prepend=True)
    results["wan"] = _outcome(lambda: wan(**inputs))
    if alone:
        hook.remove()
    results["wan_after"] = _outcome(lambda: wan(**inputs))  # the same model runs once the call is right again

    flux = models.build("flux", HEADS[2])
    plan = plan_for_model(flux, BUILTIN_PLANS)
    if alone:
        plan = dataclasses.replace(plan, attention={**plan.attention, "transformer_blocks.*.attn": "cross"})
    enable_sequence_parallel(flux, plan=plan)
    results["flux"] = _outcome(lambda: flux(**models.inputs("flux", GRID)))

    undeclared = dataclasses.replace(plan, attention={"transformer_blocks.*.attn": "joint"})
    results["undeclared"] = _outcome(lambda: enable_sequence_parallel(models.build("flux", 2), plan=undeclared))
    dist.barrier()  # both ranks are done with the groups before they go
    usp_attn.destroy_sequence_parallel()
    return results


class _SelfContainedProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        raise AssertionError("not called")


def single_rank_groups_are_exact() -> None:
    """SP groups of one rank each (ranks=[[0], [1]]): bit-identical to the unmodified model."""
    import usp_attn
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    usp_attn.destroy_sequence_parallel()
    usp_attn.init_sequence_parallel(1, 1, ranks=[[0], [1]])
    for family in ("wan", "hunyuan_video"):
        model, inputs = models.build(family, 4), models.inputs(family, GRID, batch=2)
        with torch.no_grad():
            reference = model(**inputs)[0]
        enable_sequence_parallel(model)
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_sequence_parallel(model)
        with torch.no_grad():
            out = model(**inputs)[0]
        assert torch.equal(out, reference), (family, (out - reference).abs().max())
        disable_sequence_parallel(model)
    usp_attn.destroy_sequence_parallel()


SPARSE_GRID = (5, 4, 6)  # Wan tokens (frames, h, w): 120, tiles (2, 2, 3) with a partial last frame tile
SPARSE_WINDOWS = {"sparse": (1, 2, 1), "full_window": (3, 2, 2)}  # full_window covers the grid: exactly dense


def sparse_wan(ulysses: int, ring: int, window: str) -> dict:
    """Wan with a sliding-tile pattern on its self-attention: the run reorders the tokens to tile-major order at
    the cut and back at the gather; compared with the unparallelised model whose self-attention is the fp64
    masked reference of the pattern in the model's own (row-major) order, and with the dense model."""
    import diffusers.models.transformers.transformer_wan as wan_module

    from usp_attn.integrations.diffusers import enable_sequence_parallel, set_sparsity
    from usp_attn.sparse import SlidingTileSparsity, VideoGrid, masked_reference

    state = _layout(ulysses, ring)
    pattern = SlidingTileSparsity(VideoGrid(*SPARSE_GRID), tile=(2, 2, 3), window=SPARSE_WINDOWS[window])
    model = models.build("wan", HEADS[state.world_size])
    inputs = models.inputs("wan", SPARSE_GRID, batch=2)
    tokens = pattern.grid.num_tokens
    real = wan_module.dispatch_attention_fn

    def masked_self_attention(query, key, value, attn_mask=None, **kwargs):
        if key.shape[1] != tokens:  # cross-attention to the text: dense, as usual
            return real(query, key, value, attn_mask=attn_mask, **kwargs)
        return masked_reference(query.double(), key.double(), value.double(), pattern).to(query.dtype)

    with torch.no_grad():
        dense = model(**inputs)[0]
        wan_module.dispatch_attention_fn = masked_self_attention
        try:
            reference = model(**inputs)[0]
        finally:
            wan_module.dispatch_attention_fn = real
        enable_sequence_parallel(model, sparsity=pattern)
        out = model(**inputs)[0]
        set_sparsity(model, None)  # the next call dense again (e.g. the first steps of a sampler)
        dense_again = model(**inputs)[0]
    align_after = state.shard_align
    return {"error": (out - reference).abs().max().item(), "scale": reference.abs().max().item(),
            "pattern_effect": (reference - dense).abs().max().item(),
            "dense_error": (dense_again - dense).abs().max().item(), "align_after": align_after}


def benchmark_dry_run() -> list[dict]:
    """benchmarks/diffusers_families.py at tiny shapes (its CPU dry run), Flux only."""
    import usp_attn
    from benchmarks.diffusers_families import rows

    usp_attn.destroy_sequence_parallel()
    return rows(dry_run=True, models=("flux",), warmup=0, iters=1)


def _cases(world: int) -> list:
    cases = [functools.partial(run_scenario, u, r, name) for u, r in LAYOUTS[world] for name in SCENARIOS]
    cases += [functools.partial(run_scenario, u, r, name, True) for w, u, r in RECORDED_ZIGZAG if w == world
              for name in RECORDED_ZIGZAG_SCENARIOS]
    cases.append(functools.partial(bad_inputs_fail_on_every_rank, *LAYOUTS[world][-1]))
    cases += [functools.partial(sparse_wan, u, r, w) for u, r in LAYOUTS[world] for w in SPARSE_WINDOWS]
    if world == 2:
        cases.append(functools.partial(local_only_attention_is_caught, *LAYOUTS[world][0]))
        cases.append(functools.partial(unroutable_processor_is_refused, *LAYOUTS[world][0]))
        cases.append(single_rank_groups_are_exact)
        cases.append(benchmark_dry_run)
        cases.append(functools.partial(wrong_call_on_one_rank, *LAYOUTS[world][0]))
    return cases


def _setup() -> None:
    reset_usp_attn_state()
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores


_run = runs_per_world(_cases, setup=_setup, timeout=280)


# ---- tests ---------------------------------------------------------------------------------------------
def _params():
    for world, layouts in LAYOUTS.items():
        for u, r in layouts:
            for name in SCENARIOS:
                yield pytest.param(world, u, r, name, id=f"W{world}-U{u}xR{r}-{name}",
                                   marks=[pytest.mark.slow] if world >= 4 else [])  # 4 ranks: full lane


@requires_diffusers
@pytest.mark.parametrize("world,u,r,name", list(_params()))
def test_family_matches_unparallelised_model(world, u, r, name):
    _check_matches(_run(world).check(functools.partial(run_scenario, u, r, name)), name)


@requires_diffusers
@pytest.mark.parametrize("world,u,r,name", [
    pytest.param(w, u, r, name, id=f"W{w}-U{u}xR{r}-{name}", marks=[pytest.mark.slow] if w >= 4 else [])
    for w, u, r in RECORDED_ZIGZAG for name in RECORDED_ZIGZAG_SCENARIOS])
def test_recorded_zigzag_layout_does_not_change_the_run(world, u, r, name):
    _check_matches(_run(world).check(functools.partial(run_scenario, u, r, name, True)), name)


def _check_matches(results: list[dict], name: str) -> None:
    bf16 = SCENARIOS[name][1].get("dtype") == torch.bfloat16
    for rank, res in enumerate(results):
        tol = (BF16_RTOL_OF_MAX if bf16 else RTOL_OF_MAX) * res["scale"]
        assert res["error"] <= tol, (rank, res["error"], tol)
        if res["mask_effect"] is not None:  # the text mask matters, so honouring it is tested
            assert res["mask_effect"] > 20 * tol, res["mask_effect"]
        # The first block really ran on this rank's shard of the image tokens.
        assert res["local_tokens"] == [res["expected_local"]], (rank, res["local_tokens"])
        assert res["expected_local"] < res["tokens"]
        assert res["bystander_equal"], "a model that is not enabled changed while another one was"
        assert res["restored_equal"] and res["processors_restored"], rank
        assert res["hooks_left"] == 0 and not res["enabled_after_disable"], rank
    for res in results[1:]:  # full output on every rank, identical across ranks
        assert torch.equal(res["out"], results[0]["out"])


@requires_diffusers
@pytest.mark.parametrize("world,u,r,window", [
    pytest.param(w, u, r, win, id=f"W{w}-U{u}xR{r}-{win}", marks=[pytest.mark.slow] if w >= 4 else [])
    for w, layouts in LAYOUTS.items() for u, r in layouts for win in SPARSE_WINDOWS])
def test_sparse_pattern_per_model_reorders_once_and_matches_the_masked_model(world, u, r, window):
    for rank, res in enumerate(_run(world).check(functools.partial(sparse_wan, u, r, window))):
        assert res["error"] <= RTOL_OF_MAX * res["scale"], (rank, res)
        assert res["dense_error"] <= RTOL_OF_MAX * res["scale"], (rank, res)
        assert res["align_after"] == 1, res  # the call's block alignment does not outlive it
        if window == "sparse":  # the pattern changes the output: following it is what is tested
            assert res["pattern_effect"] > 20 * RTOL_OF_MAX * res["scale"], (rank, res)
        else:
            assert res["pattern_effect"] <= RTOL_OF_MAX * res["scale"], (rank, res)


@requires_diffusers
@pytest.mark.parametrize("world", [pytest.param(w, marks=[pytest.mark.slow] if w >= 4 else [])
                                   for w in sorted(LAYOUTS)])
def test_too_few_tokens_fail_clearly_on_every_rank(world):
    messages = _run(world).check(functools.partial(bad_inputs_fail_on_every_rank, *LAYOUTS[world][-1]))
    assert all(m == messages[0] and len(m) == 1 for m in messages), messages
    assert f"fewer than the {world} sequence-parallel ranks" in messages[0][0], messages


@requires_diffusers
def test_tolerance_catches_attention_that_skips_other_ranks():
    for res in _run(2).check(functools.partial(local_only_attention_is_caught, *LAYOUTS[2][0])):
        assert res["error"] > 100 * RTOL_OF_MAX * res["scale"], res


@requires_diffusers
def test_processor_without_dispatch_is_refused():
    for message in _run(2).check(functools.partial(unroutable_processor_is_refused, *LAYOUTS[2][0])):
        assert "transformer_blocks.0.attn uses _SelfContainedProcessor" in message, message
        assert "FamilyPlan.processors" in message, message


@requires_diffusers
@pytest.mark.parametrize("model,needles", [
    ("wan", ("blocks.0.attn2: the Wan plan declares cross attention here (FamilyPlan.attention)",
             "without encoder_hidden_states", "that is self attention", "encoder_hidden_states given: rank 0: True; "
             "rank 1: False")),
    ("flux", ("transformer_blocks.0.attn: the Flux plan declares cross attention here", "that is joint attention",
              "declared attention: rank 0: 'joint'; rank 1: 'cross'")),
])
def test_wrong_call_on_one_rank_fails_fast_on_every_rank(model, needles):
    results = _run(2).check(functools.partial(wrong_call_on_one_rank, *LAYOUTS[2][0]))
    outcomes = [res[model] for res in results]
    for rank, res in enumerate(outcomes):
        assert res["type"] == "ValueError", (rank, res)
        assert res["seconds"] < WRONG_CALL_BOUND_S, (rank, res["seconds"])
    assert outcomes[0]["message"] == outcomes[1]["message"], outcomes
    message = outcomes[0]["message"]
    assert "the ranks' arguments do not agree:\n  rank 1: " in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    if model == "wan":
        assert all(res["wan_after"]["type"] is None for res in results), results


@requires_diffusers
def test_undeclared_attention_module_is_refused_at_enable():
    for res in _run(2).check(functools.partial(wrong_call_on_one_rank, *LAYOUTS[2][0])):
        assert res["undeclared"]["type"] == "ValueError", res["undeclared"]
        assert ("single_transformer_blocks.0.attn: the Flux plan does not declare whether it is self-, cross- or "
                "joint attention (FamilyPlan.attention)") in res["undeclared"]["message"], res["undeclared"]


@requires_diffusers
def test_plans_declare_every_routed_attention_module():
    from usp_attn.integrations.diffusers import FamilyPlan
    from usp_attn.integrations.diffusers.families import BUILTIN_PLANS, plan_for_model
    from usp_attn.integrations.diffusers.run import attention_modules, find_modules

    for family in models.FAMILIES:
        model = models.build(family, 2)
        plan = plan_for_model(model, BUILTIN_PLANS)
        declared = {n for path in plan.attention for n, _ in find_modules(model, path)}
        apart = {n for path in (*plan.local_attention, *plan.processors) for n, _ in find_modules(model, path)}
        assert {n for n, _ in attention_modules(model)} - apart <= declared, family
    # A model with only a diffusers _cp_plan: declared from its modules' own is_cross_attention.
    wan = models.build("wan", 2)
    assert plan_for_model(wan, {}).attention == {
        f"blocks.{i}.{name}": kind for i in range(2) for name, kind in (("attn1", "self"), ("attn2", "cross"))}
    with pytest.raises(ValueError, match=r"\['blocks\.\*\.attn'\] is joint attention, but joint_text does not say"):
        FamilyPlan("x", {}, attention={"blocks.*.attn": "joint"})
    with pytest.raises(ValueError, match=r"must be one of \('self', 'cross', 'joint'\), got 'text'"):
        FamilyPlan("x", {}, attention={"blocks.*.attn": "text"})


@requires_diffusers
def test_single_rank_groups_are_exact_and_double_enable_refused():
    _run(2).check(single_rank_groups_are_exact)


@requires_diffusers
def test_benchmark_dry_run_rows():
    rows = _run(2).check(benchmark_dry_run)[0]
    assert [(r["impl"], r["layout"]) for r in rows] == [
        ("1 GPU", "1x1"), ("usp_attn", "2x1"), ("diffusers CP", "2x1"), ("usp_attn", "1x2"), ("diffusers CP", "1x2")]
    for row in rows:
        if row["impl"] == "usp_attn":
            assert row["rel_err"] < 1e-5 and row["ms"] > 0 and row["speedup"] > 0, row
        if row["impl"] == "diffusers CP":  # diffusers' context parallelism does not run on CPU: the row says why
            assert row["ms"] is None and row["note"], row


@requires_diffusers
def test_unsupported_model_and_missing_init_errors():
    from torch import nn

    import usp_attn
    from usp_attn.integrations.diffusers import enable_sequence_parallel, supported_models

    assert {"WanTransformer3DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel",
            "LTXVideoTransformer3DModel", "HunyuanVideoTransformer3DModel",
            "CogVideoXTransformer3DModel"} <= set(supported_models())
    with pytest.raises(TypeError, match=r"does not support .*Linear: it has no diffusers _cp_plan"):
        enable_sequence_parallel(nn.Linear(2, 2))
    assert usp_attn.get_sequence_parallel_state() is None
    model = models.build("wan", 2)
    with pytest.raises(RuntimeError, match="init_sequence_parallel"):
        enable_sequence_parallel(model)
    assert not hasattr(model, "_usp_attn_sequence_parallel")


@requires_diffusers
def test_untested_diffusers_release_is_refused_unless_asked(monkeypatch, caplog):
    from usp_attn.integrations.diffusers import UNTESTED_ENV, check_diffusers_version

    check_diffusers_version("0.42.1")
    monkeypatch.delenv(UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"tested with diffusers 0\.42\.x, found 0\.43\.0"):
        check_diffusers_version("0.43.0")
    monkeypatch.setenv(UNTESTED_ENV, "1")
    check_diffusers_version("0.43.0")
    assert "proceeding" in caplog.text


def test_usp_attn_import_never_imports_diffusers_and_missing_diffusers_is_clear():
    # A fresh interpreter: importing usp_attn (and usp_attn.integrations) must not import
    # diffusers; with diffusers unavailable, the integration's ImportError says how to fix it.
    code = (
        "import sys\n"
        "import usp_attn, usp_attn.integrations\n"
        "assert 'diffusers' not in sys.modules, 'import usp_attn imported diffusers'\n"
        "sys.modules['diffusers'] = None  # what Python does for a package that cannot be imported\n"
        "try:\n"
        "    import usp_attn.integrations.diffusers\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError without diffusers')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "needs the optional package 'diffusers'" in proc.stdout, proc.stdout
    assert "pip install 'usp-attn[diffusers]'" in proc.stdout, proc.stdout
