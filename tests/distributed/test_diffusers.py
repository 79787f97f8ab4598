"""diffusers integration: a tiny randomly initialised ``WanTransformer3DModel`` under sequence
parallelism in real gloo groups of 2 and 4 processes (layouts U x R = 2x1, 1x2, 4x1, 2x2, 1x4),
compared with the same model, unparallelised, on the same inputs.

Every rank builds the model from one seed (identical weights everywhere), computes the
reference output with diffusers' own processors, then enables sequence parallelism, runs
the same full inputs and returns both. The group is spawned once per world size.

Tolerance (fp32). Both runs do the same fp32 operations on the same token rows except
attention, where only the summation order differs: Ulysses regroups heads (same kernel
over the same keys), the ring computes per-block softmax partials merged through their
log-sum-exp in fp32. Each attention output therefore differs by a few fp32 ulps
(~1e-7 relative); two blocks of LayerNorm/FFN/modulation at random init amplify that by
at most O(10), and the outputs are O(1) (measured: <= 5e-7 at max|out| ~ 2). We allow
2e-5 x max|reference|, ~50x the measured difference; a real mistake is far above it
(test_tolerance_catches_attention_that_skips_other_ranks checks that self-attention
which misses the other ranks' keys is off by more than 100x the tolerance).

Tolerance (bf16, weights loaded as from_pretrained would: bf16 except the modules diffusers
keeps in fp32). Each attention output is rounded to bf16 (2^-8 relative) at a point
that differs between the runs, so the outputs may differ by a few bf16 ulps of O(1)
values: we allow 2^-6 x max|reference| (measured: 2^-8 at max|out| ~ 1.7). And the
parallel run must be as accurate as the unparallelised one: both are compared with the
same bf16 weights/inputs computed in fp32, and the parallel error may exceed the
unparallelised error by at most 25% + 2^-8 x max|reference|.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.multiproc import run_cases
from tests.helpers.state import reset_usp_attn_state

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
requires_diffusers = pytest.mark.skipif(
    not HAVE_DIFFUSERS,
    reason="diffusers is not installed (optional extra; CI installs it via the 'test' extra: diffusers>=0.35)",
)

RTOL_OF_MAX = 2e-5
BF16_RTOL_OF_MAX = 2.0**-6

# name -> tiny model + inputs. Tokens = F/1 * H/2 * W/2 (patch 1x2x2).
SCENARIOS: dict[str, dict] = {
    # 48 tokens; 6 heads (not divisible by U=4)
    "t2v_48_tokens_6_heads": dict(heads=6, latent=(1, 4, 3, 8, 8), text=7),
    # 45 tokens (odd: uneven shards for 2 and 4 ranks); 5 heads (divisible by no U > 1); batch 2
    "t2v_45_tokens_5_heads_batch2": dict(heads=5, latent=(2, 4, 3, 6, 10), text=9),
    # fused q/k/v (to_qkv) and k/v (to_kv) projections
    "fused_projections": dict(heads=4, latent=(1, 4, 2, 8, 6), text=5, fused=True),
    # Wan 2.2 TI2V: one timestep per token ([B, S]); 27 tokens
    "per_token_timestep": dict(heads=6, latent=(2, 4, 3, 6, 6), text=6, per_token_timestep=True),
    # Wan 2.1 I2V: image tokens before 512 text tokens, added k/v projections; 15 tokens
    "i2v_image_tokens": dict(heads=4, latent=(1, 4, 1, 6, 10), text=512, image=5),
    # bf16 weights and activations (how the real models run); 35 tokens, 6 heads
    "bf16": dict(heads=6, latent=(1, 4, 5, 4, 6), text=8, dtype=torch.bfloat16),
}
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2), (1, 4)]}


# ---- run inside the spawned ranks ----------------------------------------------------------------
def _layout(ulysses: int, ring: int):
    import usp_attn

    state = usp_attn.get_sequence_parallel_state()
    if state is not None and (state.ulysses_degree, state.ring_degree) == (ulysses, ring):
        return state
    usp_attn.destroy_sequence_parallel()
    return usp_attn.init_sequence_parallel(ulysses, ring)


def _tiny_wan(heads: int, image: int | None = None, seed: int = 0):
    from diffusers import WanTransformer3DModel

    head_dim, text_dim, image_dim = 16, 32, 24
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        rope_max_seq_len=32,
        image_dim=image_dim if image else None, added_kv_proj_dim=heads * head_dim if image else None,
    )
    # diffusers initialises some weights to zero (e.g. biases, the time projection); randomise
    # everything so no path (modulation, image k/v, ...) is trivially inactive. Norm scales stay
    # near 1 so q.k logits have O(1) spread (a near-uniform softmax would hide attention errors).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _to_bf16_like_from_pretrained(model) -> None:
    """bf16 weights except the modules diffusers keeps in fp32 when loading (rope, norms, time embedder...)."""
    keep = set(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(torch.bfloat16)


def _inputs(p: dict, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, _, frames, height, width = p["latent"]
    kwargs = dict(
        hidden_states=torch.randn(*p["latent"], generator=gen),
        encoder_hidden_states=torch.randn(batch, p["text"], 32, generator=gen),
        return_dict=False,
    )
    tokens = frames * (height // 2) * (width // 2)
    if p.get("per_token_timestep"):
        kwargs["timestep"] = torch.randint(0, 1000, (batch, tokens), generator=gen).float()
    else:
        kwargs["timestep"] = torch.randint(0, 1000, (batch,), generator=gen).float()
    if p.get("image"):
        kwargs["encoder_hidden_states_image"] = torch.randn(batch, p["image"], 24, generator=gen)
    dtype = p.get("dtype", torch.float32)
    for key in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image"):
        if key in kwargs:
            kwargs[key] = kwargs[key].to(dtype)
    return kwargs


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run_scenario(ulysses: int, ring: int, name: str) -> dict:
    from usp_attn.distributed.state import shard_sizes
    from usp_attn.integrations.diffusers import (
        disable_sequence_parallel, enable_sequence_parallel, is_sequence_parallel_enabled,
    )

    p = SCENARIOS[name]
    state = _layout(ulysses, ring)
    model = _tiny_wan(p["heads"], p.get("image"))
    if p.get("fused"):
        model.fuse_qkv_projections()
    inputs = _inputs(p)
    exact = None
    if p.get("dtype") == torch.bfloat16:
        _to_bf16_like_from_pretrained(model)
        # The same bf16-valued weights and inputs, computed in fp32: the yardstick both bf16 runs are measured by.
        with torch.no_grad():
            as_fp32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
            exact = copy.deepcopy(model).float()(**as_fp32)[0]
    original = dict(model.attn_processors)
    hooks_before = _hook_count(model)
    with torch.no_grad():
        reference = model(**inputs)[0]

    seen = []  # token rows each self-attention call gets on this rank
    probes = [block.attn1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
              for block in model.blocks]
    enable_sequence_parallel(model)
    assert is_sequence_parallel_enabled(model)
    with torch.no_grad():
        out = model(**inputs)[0]
    for probe in probes:
        probe.remove()

    disable_sequence_parallel(model)
    with torch.no_grad():
        restored = model(**inputs)[0]
    _, _, frames, height, width = inputs["hidden_states"].shape
    tokens = frames * (height // 2) * (width // 2)
    return dict(
        tokens=tokens, out=out, reference=reference,
        error=(out.float() - reference.float()).abs().max().item(), scale=reference.float().abs().max().item(),
        local_tokens=seen, expected_local=shard_sizes(tokens, state.world_size)[state.sp_rank],
        restored_equal=torch.equal(restored, reference),
        processors_restored=all(model.attn_processors[k] is v for k, v in original.items()),
        hooks_left=_hook_count(model) - hooks_before,
        enabled_after_disable=is_sequence_parallel_enabled(model),
        error_vs_fp32=None if exact is None else (out.float() - exact).abs().max().item(),
        reference_error_vs_fp32=None if exact is None else (reference.float() - exact).abs().max().item(),
    )


def bad_inputs_fail_on_every_rank(ulysses: int, ring: int) -> list[str]:
    """Wrong inputs raise the same clear error on every rank, and the model still works after."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    state = _layout(ulysses, ring)
    model = enable_sequence_parallel(_tiny_wan(4))
    p = SCENARIOS["fused_projections"]
    messages = []
    too_small = dict(_inputs(p), hidden_states=torch.randn(1, 4, 1, 2, 2 * (state.world_size - 1)))
    not_video = dict(_inputs(p), hidden_states=torch.randn(1, 4, 8, 6))
    for bad in (too_small, not_video):
        try:
            with torch.no_grad():
                model(**bad)
        except ValueError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError("a bad input was accepted")
    with torch.no_grad():
        out = model(**_inputs(p))[0]  # the failed calls left no half-finished state behind
    assert out.shape == p["latent"], out.shape
    return messages


def local_only_attention_is_caught(ulysses: int, ring: int) -> dict:
    """Sensitivity check of the tolerance: self-attention that sees only this rank's keys must fail it."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    import usp_attn

    p = SCENARIOS["t2v_48_tokens_6_heads"]
    _layout(ulysses, ring)
    model, inputs = _tiny_wan(p["heads"]), _inputs(p)
    with torch.no_grad():
        reference = model(**inputs)[0]
    enable_sequence_parallel(model)
    for block in model.blocks:
        block.attn1.processor.attention = _ShardOnly(usp_attn.LocalAttention(p["heads"], 16))
    with torch.no_grad():
        out = model(**inputs)[0]
    return dict(error=(out - reference).abs().max().item(), scale=reference.abs().max().item())


class _ShardOnly:
    """A deliberately wrong attention: the local shard's queries against the local shard's keys only."""

    def __init__(self, local) -> None:
        self.local = local

    def __call__(self, q, k, v, seq_len=None):
        return self.local(q, k, v)


def single_rank_groups_are_exact() -> None:
    """SP groups of one rank each (ranks=[[0], [1]]): bit-identical to the unmodified model."""
    import usp_attn
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    usp_attn.destroy_sequence_parallel()
    state = usp_attn.init_sequence_parallel(1, 1, ranks=[[0], [1]])
    assert state.world_size == 1
    p = SCENARIOS["per_token_timestep"]
    model, inputs = _tiny_wan(p["heads"]), _inputs(p)
    with torch.no_grad():
        reference = model(**inputs)[0]
    enable_sequence_parallel(model)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_sequence_parallel(model)
    with torch.no_grad():
        out = model(**inputs)[0]
    # Same kernel, same rows, same order: bit-identical (this also pins our rotary to diffusers').
    assert torch.equal(out, reference), (out - reference).abs().max()
    disable_sequence_parallel(model)
    usp_attn.destroy_sequence_parallel()


def _cases(world: int) -> list:
    cases = [functools.partial(run_scenario, u, r, name) for u, r in LAYOUTS[world] for name in SCENARIOS]
    cases.append(functools.partial(bad_inputs_fail_on_every_rank, *LAYOUTS[world][0]))
    if world == 2:
        cases.append(functools.partial(local_only_attention_is_caught, *LAYOUTS[world][0]))
        cases.append(single_rank_groups_are_exact)
    return cases


def _setup() -> None:
    reset_usp_attn_state()
    # Up to 4 ranks share 2 cores: one thread each avoids oversubscription (3x faster here).
    torch.set_num_threads(1)


_runs: dict[int, object] = {}


def _run(world: int):
    # One spawned group per world size runs all of its cases.
    if world not in _runs:
        _runs[world] = run_cases(world, _cases(world), setup=_setup, timeout=240)
    return _runs[world]


# ---- tests --------------------------------------------------------------------------------------
def _params():
    for world, layouts in LAYOUTS.items():
        for u, r in layouts:
            for name in SCENARIOS:
                yield pytest.param(world, u, r, name, id=f"W{world}-U{u}xR{r}-{name}")


@requires_diffusers
@pytest.mark.parametrize("world,u,r,name", list(_params()))
def test_wan_matches_unparallelised_model(world, u, r, name):
    results = _run(world).check(functools.partial(run_scenario, u, r, name))
    bf16 = SCENARIOS[name].get("dtype") == torch.bfloat16
    for rank, res in enumerate(results):
        tol = (BF16_RTOL_OF_MAX if bf16 else RTOL_OF_MAX) * res["scale"]
        assert res["error"] <= tol, (rank, res["error"], tol)
        if bf16:  # as accurate as the unparallelised bf16 model, both measured against fp32
            assert res["error_vs_fp32"] <= 1.25 * res["reference_error_vs_fp32"] + 2.0**-8 * res["scale"], res
        # The blocks really ran on this rank's shard (two blocks -> two self-attention calls).
        assert res["local_tokens"] == [res["expected_local"]] * 2, (rank, res["local_tokens"])
        assert res["expected_local"] < res["tokens"]
        # disable_sequence_parallel gives back exactly the original model.
        assert res["restored_equal"] and res["processors_restored"], rank
        assert res["hooks_left"] == 0 and not res["enabled_after_disable"], rank
    # Full output on every rank, identical across ranks.
    assert tuple(results[0]["out"].shape) == SCENARIOS[name]["latent"]
    for res in results[1:]:
        assert torch.equal(res["out"], results[0]["out"])


@requires_diffusers
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_bad_inputs_fail_clearly_on_every_rank(world):
    messages = _run(world).check(functools.partial(bad_inputs_fail_on_every_rank, *LAYOUTS[world][0]))
    assert all(m == messages[0] for m in messages), messages
    too_small, not_video = messages[0]
    assert f"fewer than the {world} sequence-parallel ranks" in too_small, too_small
    assert "expects hidden_states [B, C, F, H, W]" in not_video and "[1, 4, 8, 6]" in not_video, not_video


@requires_diffusers
def test_tolerance_catches_attention_that_skips_other_ranks():
    for res in _run(2).check(functools.partial(local_only_attention_is_caught, *LAYOUTS[2][0])):
        assert res["error"] > 100 * RTOL_OF_MAX * res["scale"], res


@requires_diffusers
def test_single_rank_groups_are_exact_and_double_enable_refused():
    _run(2).check(single_rank_groups_are_exact)


@requires_diffusers
def test_unsupported_model_and_missing_init_errors():
    from torch import nn

    import usp_attn
    from usp_attn.integrations.diffusers import enable_sequence_parallel, supported_models

    assert "WanTransformer3DModel" in supported_models()
    with pytest.raises(TypeError, match=r"does not support .*Linear; supported model classes: WanTransformer3DModel"):
        enable_sequence_parallel(nn.Linear(2, 2))
    assert usp_attn.get_sequence_parallel_state() is None
    model = _tiny_wan(2)
    with pytest.raises(RuntimeError, match="init_sequence_parallel"):
        enable_sequence_parallel(model)
    assert not hasattr(model, "_usp_attn_sequence_parallel")


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
