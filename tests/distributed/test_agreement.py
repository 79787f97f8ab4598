"""agree_on_backend in real multi-process gloo groups (4 ranks, plus 2- and 3-rank subgroups),
with a different injected platform and request on each rank.

One group is spawned for the whole module (tests/helpers/multiproc.py); each case below runs
on every rank, starting from a reset selection state, and reports per rank. Ranks exchange
their results with real collectives so each case can assert that all ranks agree.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from tests.helpers.logs import capture_logs, messages_at
from tests.helpers.multiproc import case_name, run_cases
from tests.helpers.state import reset_usp_attn_state
from usp_attn import AttentionBackendEnum as B
from usp_attn import AttentionBackendUnavailableError, AttentionConfig, LocalAttention, global_force_attn_backend, global_force_attn_backend_context_manager
from usp_attn.distributed.agreement import agree_on_backend
from usp_attn.platforms import Platform, override_platform
from usp_attn.selector import get_attn_backend, set_cli_attention_backend

WORLD = 4
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def cuda(cap, **packages):
    return Platform.make("cuda", capability=cap, packages=packages)


HOPPER_ALL = cuda((9, 0), flash_attn_interface="", sageattention="2.1.1")
HOPPER_FA3 = cuda((9, 0), flash_attn_interface="")
AMPERE_FA2 = cuda((8, 0), flash_attn="2.7.0")
AMPERE_BARE = cuda((8, 0))
BLACKWELL_FA4 = cuda((10, 0), **{"flash_attn.cute": ""})

# Per-layer properties a DiT might have; selections must come out identical on every rank.
LAYERS = [
    dict(head_size=128, dtype=BF16),
    dict(head_size=64, dtype=FP16, need_lse=True),
    dict(head_size=80, dtype=BF16),
    dict(head_size=128, dtype=FP32),
    dict(head_size=128, dtype=BF16, need_mask=True),
    dict(head_size=192, dtype=BF16),
    dict(head_size=512, dtype=BF16),
]


def rank() -> int:
    return dist.get_rank()


def gather(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def assert_same_on_all_ranks(obj, what: str, group=None) -> list:
    everyone = gather(obj, group)
    assert all(o == everyone[0] for o in everyone), f"{what} differs between ranks: {everyone}"
    return everyone


def per_layer_selections():
    return [get_attn_backend(l["head_size"], l["dtype"], need_lse=l.get("need_lse", False),
                             need_mask=l.get("need_mask", False)) for l in LAYERS]


# ---- cases (run on every rank) -------------------------------------------------------------------------
def case_different_requests_follow_rank_0():
    """Requests come from the CLI setting, the force setting, or nowhere; rank 0's wins everywhere."""
    request = {0: ("cli", "sage_attn"), 1: ("forced", "fa"), 2: (None, None), 3: ("cli", "sage_attn")}[rank()]
    if request[0] == "cli":
        set_cli_attention_backend(request[1])
    elif request[0] == "forced":
        global_force_attn_backend(request[1])
    with capture_logs() as records:
        agreement = agree_on_backend(platform=HOPPER_ALL)
    assert agreement.backend is B.SAGE_ATTN and agreement.requested is B.SAGE_ATTN
    assert agreement.source == "cli" and agreement.world_size == WORLD
    assert_same_on_all_ranks(agreement, "agreement")

    warnings = messages_at(records, logging.WARNING)
    if rank() in (1, 2):  # their request differed from rank 0's: ignored, with a warning
        (text,) = warnings
        assert f"rank {rank()} requested attention backend {'fa' if rank() == 1 else 'auto'}" in text
        assert "rank 0 requested sage_attn" in text
    else:
        assert warnings == []

    # Every layer resolves the same way on every rank, including rank 1 whose force was overruled.
    selections = per_layer_selections()
    assert selections[0].backend is B.SAGE_ATTN and selections[0].source == "group"
    assert selections[3].backend is B.TORCH_SDPA  # fp32: sage -> fa -> torch_sdpa, on every rank
    assert_same_on_all_ranks([s.to_dict() for s in selections], "per-layer selections")
    assert_same_on_all_ranks(selections, "per-layer selections")
    layer = LocalAttention(num_heads=8, head_size=128)
    assert_same_on_all_ranks(layer.selection(BF16).backend, "LocalAttention.backend")


def case_explicit_argument_and_auto_on_rank_0():
    """``requested=`` argument; rank 0 asks for automatic selection while others ask for things."""
    request = [None, "sage_attn", "torch_sdpa", "fa"][rank()]
    with capture_logs() as records:
        agreement = agree_on_backend(requested=request, platform=HOPPER_ALL)
    assert agreement.requested is None and agreement.backend is B.FA  # auto on Hopper with FA3
    assert len(messages_at(records, logging.WARNING)) == (0 if rank() == 0 else 1)
    sel = get_attn_backend(128, BF16)
    assert sel.backend is B.FA and sel.source == "auto" and sel.requested is None
    assert_same_on_all_ranks([s.to_dict() for s in per_layer_selections()], "per-layer selections")


def case_missing_sageattention_on_rank_2_all_fall_back():
    platform = HOPPER_FA3 if rank() == 2 else HOPPER_ALL
    with capture_logs() as records:
        agreement = agree_on_backend(requested="sage_attn", platform=platform)
    assert agreement.requested is B.SAGE_ATTN and agreement.backend is B.FA
    assert B.SAGE_ATTN not in agreement.available and B.FA in agreement.available
    (bad,) = [u for u in agreement.unavailable if u[0] is B.SAGE_ATTN]
    assert bad[1] == 2 and "sageattention" in bad[2]
    if rank() == 0:  # rank 0 explains the group-wide fallback, naming the rank and the reason
        assert any("unavailable on rank 2" in m and "sageattention" in m and "'fa'" in m
                   for m in messages_at(records, logging.WARNING))

    with capture_logs() as records:
        selections = per_layer_selections()
    sel = selections[0]
    assert sel.backend is B.FA and sel.fell_back and sel.requested is B.SAGE_ATTN
    assert sel.rejected[0][0] is B.SAGE_ATTN and "rank 2" in sel.rejected[0][1]
    # Every rank logs the same fallback once (the same text on each rank).
    fallback = [m for m in messages_at(records, logging.WARNING) if "'sage_attn' cannot run" in m]
    assert fallback and all("rank 2" in m for m in fallback)
    assert_same_on_all_ranks(selections, "per-layer selections")
    assert_same_on_all_ranks(fallback, "fallback warnings")


def case_missing_sage_and_fa3_on_rank_2_falls_to_torch_sdpa():
    platform = AMPERE_BARE if rank() == 2 else HOPPER_ALL
    agreement = agree_on_backend(requested="sage_attn", platform=platform)
    assert agreement.backend is B.TORCH_SDPA
    reasons = {b: (r, why) for b, r, why in agreement.unavailable}
    assert reasons[B.SAGE_ATTN][0] == 2 and reasons[B.FA][0] == 2
    assert_same_on_all_ranks([s.backend for s in per_layer_selections()], "per-layer backends")
    assert all(s.backend is B.TORCH_SDPA for s in per_layer_selections())


def case_strict_raises_on_every_rank_naming_rank_2():
    platform = HOPPER_FA3 if rank() == 2 else HOPPER_ALL
    with pytest.raises(AttentionBackendUnavailableError) as info:
        agree_on_backend(requested="sage_attn", platform=platform, strict=True)
    message = str(info.value)
    assert "sage_attn" in message and "rank 2" in message and "sageattention" in message
    assert_same_on_all_ranks(message, "strict error")
    dist.barrier()  # nobody is stuck in a collective: the group is still usable
    # Nothing was installed by the failed agreement.
    from usp_attn.selector import get_group_agreement

    assert get_group_agreement() is None


def case_strict_with_a_request_everyone_can_run():
    AttentionConfig(attention_backend="fa", strict=True).apply()  # what --attention-strict does
    agreement = agree_on_backend(platform=HOPPER_FA3 if rank() % 2 else HOPPER_ALL)
    assert agreement.backend is B.FA
    assert get_attn_backend(128, BF16).backend is B.FA
    with pytest.raises(AttentionBackendUnavailableError, match="head sizes 8..256"):
        get_attn_backend(512, BF16)  # per-layer strictness still applies, identically on every rank


def case_auto_with_mixed_platforms_uses_what_every_rank_has():
    """Rank 0 (Hopper + FA3) alone would pick fa, but rank 3 has no FlashAttention at all."""
    platform = [HOPPER_FA3, AMPERE_FA2, HOPPER_ALL, AMPERE_BARE][rank()]
    agreement = agree_on_backend(platform=platform)
    assert agreement.requested is None and agreement.backend is B.TORCH_SDPA
    assert agreement.platform == HOPPER_FA3  # rank 0's platform drives the rules
    assert ((B.FA, 3) in [(b, r) for b, r, _ in agreement.unavailable])
    assert all(s.backend is B.TORCH_SDPA for s in per_layer_selections())
    assert_same_on_all_ranks(per_layer_selections(), "per-layer selections")


def case_auto_follows_rank_0_platform():
    """Rank 0 has no FlashAttention package: the group uses torch_sdpa although others have FA3."""
    platform = AMPERE_BARE if rank() == 0 else HOPPER_FA3
    agreement = agree_on_backend(platform=platform)
    assert agreement.backend is B.TORCH_SDPA
    assert_same_on_all_ranks([s.to_dict() for s in per_layer_selections()], "per-layer selections")


def case_mixed_flash_generations_bind_each_rank_to_its_own_kernel():
    """All ranks can run fa, but with different generations: per-layer rules must hold on every
    rank (FA4 on Blackwell takes 8..128 or 256, not 192) and each rank must call its own installed kernel."""
    platform = [HOPPER_FA3, AMPERE_FA2, BLACKWELL_FA4, HOPPER_FA3][rank()]
    with override_platform(platform):  # this process "is" that machine
        agreement = agree_on_backend()
        assert agreement.backend is B.FA
        selections = per_layer_selections()
        assert_same_on_all_ranks(selections, "per-layer selections")
        by_head = {l["head_size"]: s for l, s in zip(LAYERS, selections) if l["dtype"] is BF16 and len(l) == 2}
        assert by_head[128].backend is B.FA
        # 192 is fine for FA3/FA2 but not for rank 2's FA4: the whole group must use torch_sdpa.
        assert by_head[192].backend is B.TORCH_SDPA
        assert any("rank 2" in why and "FA4" in why for _, why in by_head[192].rejected)
        expected_generation = {0: "fa3", 1: "fa2", 2: "fa4", 3: "fa3"}[rank()]
        assert by_head[128].impl.generation == expected_generation
        layer = LocalAttention(num_heads=8, head_size=128)
        assert layer.selection(BF16).impl.generation == expected_generation


def case_force_context_manager_after_agreement_applies_on_all_ranks():
    agreement = agree_on_backend(platform=HOPPER_ALL)
    assert agreement.backend is B.FA
    layer = LocalAttention(num_heads=8, head_size=128)
    assert layer.selection(BF16).backend is B.FA  # resolved (and cached) once
    with global_force_attn_backend_context_manager("sage_attn"):
        sel = layer.selection(BF16)
        assert sel.backend is B.SAGE_ATTN and sel.source == "forced"
        assert_same_on_all_ranks(sel, "forced selection")
    assert layer.selection(BF16).backend is B.FA


def case_subgroup_of_two_uses_its_own_rank_0():
    """In the group of global ranks [2, 3], global rank 2 is group rank 0 and decides."""
    sub = dist.new_group([2, 3])  # every rank must take part in creating the group
    if rank() not in (2, 3):
        return None
    platform = HOPPER_ALL if rank() == 2 else HOPPER_FA3
    agreement = agree_on_backend(sub, requested="fa" if rank() == 2 else "torch_sdpa", platform=platform)
    assert agreement.world_size == 2 and agreement.requested is B.FA and agreement.backend is B.FA
    assert_same_on_all_ranks(agreement, "subgroup agreement", group=sub)
    return str(agreement.backend)


def case_subgroup_of_three_strict_names_the_group_rank():
    sub = dist.new_group([1, 2, 3])
    if rank() == 0:
        return None
    platform = AMPERE_BARE if rank() == 3 else HOPPER_ALL  # global rank 3 = group rank 2
    with pytest.raises(AttentionBackendUnavailableError) as info:
        agree_on_backend(sub, requested="fa", platform=platform, strict=True)
    assert "rank 2" in str(info.value) and "flash_attn" in str(info.value)
    assert_same_on_all_ranks(str(info.value), "subgroup strict error", group=sub)


def case_bad_name_on_one_rank_raises_everywhere_without_hanging():
    request = "flash" if rank() == 1 else "fa"
    with pytest.raises(ValueError) as info:
        agree_on_backend(requested=request, platform=HOPPER_FA3)
    message = str(info.value)
    if rank() == 1:  # the rank with the typo gets the usual parse error
        assert "unknown attention backend 'flash'" in message and "torch_sdpa" in message
    else:  # the others learn which rank failed and why
        assert "rank 1" in message and "unknown attention backend 'flash'" in message
    dist.barrier()


def case_cpu_group_runs_attention_identically():
    """On this CPU machine the agreed backend actually runs: same inputs -> same outputs."""
    set_cli_attention_backend(["fa", "torch_sdpa", "sage_attn", "aiter"][rank()])
    agreement = agree_on_backend()
    assert agreement.requested is B.FA and agreement.backend is B.TORCH_SDPA
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 4, 32, dtype=BF16) for _ in range(3))
    layer = LocalAttention(num_heads=4, head_size=32)
    out = layer(q, k, v)
    assert layer.backend is B.TORCH_SDPA
    everyone = gather(out)
    assert all(torch.equal(o, everyone[0]) for o in everyone)


CASES = [
    case_different_requests_follow_rank_0,
    case_explicit_argument_and_auto_on_rank_0,
    case_missing_sageattention_on_rank_2_all_fall_back,
    case_missing_sage_and_fa3_on_rank_2_falls_to_torch_sdpa,
    case_strict_raises_on_every_rank_naming_rank_2,
    case_strict_with_a_request_everyone_can_run,
    case_auto_with_mixed_platforms_uses_what_every_rank_has,
    case_auto_follows_rank_0_platform,
    case_mixed_flash_generations_bind_each_rank_to_its_own_kernel,
    case_force_context_manager_after_agreement_applies_on_all_ranks,
    case_subgroup_of_two_uses_its_own_rank_0,
    case_subgroup_of_three_strict_names_the_group_rank,
    case_bad_name_on_one_rank_raises_everywhere_without_hanging,
    case_cpu_group_runs_attention_identically,
]

# With pytest-xdist, `--dist loadgroup` keeps this module on one worker (one spawn).
pytestmark = pytest.mark.xdist_group("agreement")


@pytest.fixture(scope="module")
def group_run():
    return run_cases(WORLD, CASES, setup=reset_usp_attn_state, timeout=180, collective_timeout=30)


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_agreement(group_run, case):
    group_run.check(case)
