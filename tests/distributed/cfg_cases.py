"""Cases run inside spawned gloo groups by test_cfg.py: CFG parallelism (cfg x Ulysses x ring).

Each case builds its layout with ``init_sequence_parallel(U, R, cfg_degree=C)`` and compares a guided denoising run
with the same run in this process without any parallelism (no state: plain attention), on identical inputs:

* the built-in model (launch/tiny_dit.py, random weights: 6 heads, 70 tokens) through launch's ``denoise``, which
  batches ``[negative, text]``; under CFG the batch is split (launch/builtin_job.py ``cfg_parallel``);
* the real diffusers pipelines (0.42) of every supported family: four that call the transformer once per branch
  (Wan, Qwen-Image, and Flux and HunyuanVideo with true CFG) and two that batch the branches (CogVideoX, LTX-Video),
  with tiny random transformers (tests/distributed/diffusers_models.py), precomputed prompt embeddings (no text
  encoder) and latent output (no VAE). The two branches' text differs (Qwen-Image: 7 vs 5 text tokens; LTX-Video
  and HunyuanVideo: a padded negative prompt).

Tolerance (fp32): both runs do the same fp32 math except attention's summation order (Ulysses regroups heads, the
ring merges partial softmaxes in fp32) and batch-size-dependent kernel blocking; the CFG split and gather copy
values exactly. A few ulps per attention output, amplified by <= O(10) through 2 blocks and 3 steps (measured in
the report of each case): bound 1e-4 of the output scale, as the diffusers tests. ``swap_effect`` shows the bound
would catch the branches swapped (cond computed with the negative prompt and vice versa).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
if str(LAUNCH) not in sys.path:
    sys.path.insert(0, str(LAUNCH))

RTOL_OF_MAX = 1e-4
STEPS = 3
# (cfg, U, R) of 4 ranks with cfg in {1, 2}: those with CFG and U2xR2 in the fast lane, the pure U4 and R4 (sequence
# parallelism alone, tested at the model level in test_diffusers.py) in the full lane
LAYOUTS_4 = [(2, 2, 1), (2, 1, 2), (1, 2, 2)]
LAYOUTS_4_SLOW = [(1, 4, 1), (1, 1, 4)]
# every (cfg, U, R) of 8 ranks, in the full lane: with CFG, and sequence parallelism alone (U8 splits more heads
# than some models have: the Ulysses layer pads them)
LAYOUTS_8 = [(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8)]
PIPELINES = ("wan", "qwen", "flux", "hunyuan_video", "cogvideox", "ltx")
TWO_CALLS = ("wan", "qwen", "flux", "hunyuan_video")


def ensure_layout(cfg: int, ulysses: int, ring: int, **kwargs):
    import usp_attn

    state = usp_attn.get_sequence_parallel_state()
    if state is not None and (state.cfg_degree, state.ulysses_degree, state.ring_degree) == (cfg, ulysses, ring) \
            and not kwargs:
        return state
    usp_attn.destroy_sequence_parallel()
    return usp_attn.init_sequence_parallel(ulysses, ring, cfg_degree=cfg, **kwargs)


# ---- the layout itself ---------------------------------------------------------------------------------------
def layout_fields(cfg: int, ulysses: int, ring: int) -> dict:
    """The state's CFG fields follow global = cfg_rank * (U * R) + sp_rank, and one backend for every rank."""
    state = ensure_layout(cfg, ulysses, ring)
    rank, sp = dist.get_rank(), ulysses * ring
    assert state.cfg_degree == cfg and state.world_size == sp
    assert state.cfg_rank == rank // sp and state.sp_rank == rank % sp, (rank, state.cfg_rank, state.sp_rank)
    assert state.sp_ranks == tuple(range(state.cfg_rank * sp, (state.cfg_rank + 1) * sp)), state.sp_ranks
    assert state.cfg_ranks == tuple(range(rank % sp, cfg * sp, sp)), state.cfg_ranks
    assert (state.cfg_group is None) == (cfg == 1)
    if cfg > 1:
        assert tuple(dist.get_process_group_ranks(state.cfg_group)) == state.cfg_ranks
    # Every CFG group agreed with the others: the agreement counted the whole unit.
    assert state.agreement.world_size == cfg * sp, state.agreement.world_size
    return dict(backend=str(state.backend), sp_ranks=state.sp_ranks, cfg_ranks=state.cfg_ranks)


def mesh_with_cfg_dim() -> dict:
    """A DeviceMesh ("cfg", "ring", "ulysses") = (2, 1, 2) gives the same layout as cfg_degree=2, U=2."""
    import usp_attn
    from torch.distributed.device_mesh import init_device_mesh

    usp_attn.destroy_sequence_parallel()
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("cfg", "ring", "ulysses"))
    state = usp_attn.init_sequence_parallel(mesh=mesh)
    try:
        result = dict(degrees=(state.cfg_degree, state.ulysses_degree, state.ring_degree), sp_ranks=state.sp_ranks,
                      cfg_ranks=state.cfg_ranks, mesh_ranks=state.device_mesh.mesh.flatten().tolist(),
                      mesh_dims=state.device_mesh.mesh_dim_names)
        try:
            usp_attn.destroy_sequence_parallel()
            usp_attn.init_sequence_parallel(mesh=mesh, cfg_degree=4)
        except ValueError as exc:
            result["contradiction"] = str(exc)
        return result
    finally:
        usp_attn.destroy_sequence_parallel()


def bad_degree(kwargs: dict) -> str:
    """A bad cfg_degree: the same ValueError on every rank, nothing left behind (a good init works after)."""
    import usp_attn

    usp_attn.destroy_sequence_parallel()
    try:
        usp_attn.init_sequence_parallel(**kwargs)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"init_sequence_parallel accepted {kwargs}")
    assert usp_attn.get_sequence_parallel_state() is None
    ensure_layout(2, 2, 1)
    return message


def split_errors() -> list[str]:
    """cfg_split of a batch that cfg_degree does not divide (cfg_degree 4 over a guided batch of 2 rows)."""
    import usp_attn

    state = ensure_layout(4, 1, 1)
    messages = []
    for x in (torch.zeros(2, 3), torch.zeros(1, 3)):
        try:
            usp_attn.cfg_split(x, 0, state)
        except ValueError as exc:
            messages.append(str(exc))
    # A batch of 4 rows (2 samples x 2 branches) does split over 4 CFG groups, and gathers back exactly.
    x = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    part = usp_attn.cfg_split(x, 0, state)
    assert torch.equal(part, x[state.cfg_rank:state.cfg_rank + 1])
    assert torch.equal(usp_attn.cfg_gather(part, 0, state), x)
    return messages


# ---- the built-in model --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _builtin_reference():
    from builtin_job import WEIGHT_SEED
    from flow_match import denoise, flow_match_sigmas
    from moving_shapes import encode_prompts, parse_prompt
    from tiny_dit import TinyDiTConfig, TinyWanDiT

    cfg = TinyDiTConfig(hidden_size=96, num_heads=6, num_layers=2)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(1, cfg.in_channels, 2, 10, 14, generator=gen)  # 2 x 5 x 7 = 70 tokens
    text = encode_prompts([parse_prompt("a red circle moving right")], cfg.text_dim)
    negative = encode_prompts([parse_prompt("a blue square moving up")], cfg.text_dim)
    sigmas = flow_match_sigmas(STEPS, 5.0)
    model = TinyWanDiT(cfg, sequence_parallel=False).init_weights(WEIGHT_SEED).eval()
    want = denoise(model, noise, text, negative, sigmas, 3.0)
    swapped = denoise(model, noise, negative, text, sigmas, 3.0)
    return cfg, (noise, text, negative, sigmas), model.state_dict(), want, swapped


def builtin_model(cfg_degree: int, ulysses: int, ring: int) -> dict:
    from builtin_job import cfg_parallel
    from flow_match import denoise
    from tiny_dit import TinyWanDiT

    state = ensure_layout(cfg_degree, ulysses, ring)
    cfg, (noise, text, negative, sigmas), weights, want, swapped = _builtin_reference()
    model = TinyWanDiT(cfg, sequence_parallel=True)
    model.load_state_dict(weights)
    model.eval()
    rows = []
    probe = model.blocks[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    got = denoise(cfg_parallel(model, state), noise, text, negative, sigmas, 3.0)
    probe.remove()
    scale = want.abs().max().item()
    return dict(error=(got - want).abs().max().item(), scale=scale, swap_effect=(swapped - want).abs().max().item(),
                batch_rows=rows)


# ---- diffusers pipelines -------------------------------------------------------------------------------------
def _embeddings(family: str):
    from tests.distributed import diffusers_models as models

    gen = torch.Generator().manual_seed(11)
    text = lambda n: torch.randn(1, n, models.TEXT_DIM, generator=gen)  # noqa: E731
    if family == "qwen":  # the negative prompt has fewer tokens: the two CFG groups attend over different lengths
        return dict(prompt_embeds=text(7), prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
                    negative_prompt_embeds=text(5), negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long))
    negative_mask = torch.ones(1, 7, dtype=torch.long)
    negative_mask[:, 4:] = 0  # a padded negative prompt
    pooled = lambda: torch.randn(1, models.POOLED, generator=gen)  # noqa: E731
    if family == "ltx":
        return dict(prompt_embeds=text(7), prompt_attention_mask=torch.ones(1, 7, dtype=torch.long),
                    negative_prompt_embeds=text(7), negative_prompt_attention_mask=negative_mask)
    if family == "hunyuan_video":
        return dict(prompt_embeds=text(7), pooled_prompt_embeds=pooled(),
                    prompt_attention_mask=torch.ones(1, 7, dtype=torch.long), negative_prompt_embeds=text(7),
                    negative_pooled_prompt_embeds=pooled(), negative_prompt_attention_mask=negative_mask)
    if family == "flux":
        return dict(prompt_embeds=text(7), pooled_prompt_embeds=pooled(), negative_prompt_embeds=text(7),
                    negative_pooled_prompt_embeds=pooled())
    return dict(prompt_embeds=text(7), negative_prompt_embeds=text(7))


def _swap(embeddings: dict) -> dict:
    swapped = {}
    for key, value in embeddings.items():
        other = key.removeprefix("negative_") if key.startswith("negative_") else "negative_" + key
        swapped[other] = value
    return swapped


def _pipeline(family: str, heads: int):
    import diffusers

    from tests.distributed import diffusers_models as models

    transformer = models.build(family, heads)
    if family == "wan":
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)), \
            dict(height=48, width=80, num_frames=5, guidance_scale=4.0)  # 2 x 3 x 5 = 30 tokens
    if family == "qwen":
        return diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                           text_encoder=None, tokenizer=None, transformer=transformer), \
            dict(height=64, width=80, true_cfg_scale=4.0)  # 4 x 5 = 20 tokens
    if family == "flux":
        return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer), \
            dict(height=64, width=80, true_cfg_scale=4.0)  # 4 x 5 = 20 tokens
    if family == "hunyuan_video":
        return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, transformer=transformer, vae=None,
                                              scheduler=diffusers.FlowMatchEulerDiscreteScheduler()), \
            dict(height=48, width=80, num_frames=5, true_cfg_scale=4.0)  # 2 x 3 x 5 = 30 tokens
    if family == "cogvideox":
        return diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                           scheduler=diffusers.CogVideoXDDIMScheduler()), \
            dict(height=64, width=80, num_frames=5, guidance_scale=4.0)  # 2 x 4 x 5 = 40 tokens
    if family == "ltx":
        return diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                     text_encoder=None, tokenizer=None, transformer=transformer), \
            dict(height=96, width=160, num_frames=9, guidance_scale=4.0)  # 2 x 3 x 5 = 30 tokens
    raise ValueError(family)


def _generate(pipe, options: dict, embeddings: dict, steps: int = STEPS) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**embeddings, **options, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(1))
    return (out.frames if hasattr(out, "frames") else out.images).float()


@functools.lru_cache(maxsize=None)
def _pipeline_reference(family: str, heads: int):
    pipe, options = _pipeline(family, heads)
    embeddings = _embeddings(family)
    with torch.no_grad():
        want = _generate(pipe, options, embeddings)
        swapped = _generate(pipe, options, _swap(embeddings))
    return want, (swapped - want).abs().max().item()


def pipeline(family: str, cfg_degree: int, ulysses: int, ring: int) -> dict:
    """The pipeline with sequence (and CFG) parallelism on its transformer vs the same pipeline in one process."""
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    from tests.distributed import diffusers_models as models

    ensure_layout(cfg_degree, ulysses, ring)
    want, swap_effect = _pipeline_reference(family, 6)
    pipe, options = _pipeline(family, 6)
    enable_sequence_parallel(pipe.transformer)
    computed = []  # batch rows of each transformer call this rank computed
    probe = models.first_block(pipe.transformer, family).register_forward_pre_hook(
        lambda m, args, kwargs: computed.append(kwargs.get("hidden_states", args[0] if args else None).shape[0]),
        with_kwargs=True)
    with torch.no_grad():
        got = _generate(pipe, options, _embeddings(family))
    probe.remove()
    disable_sequence_parallel(pipe.transformer)
    assert "forward" not in vars(pipe.transformer)
    return dict(error=(got - want).abs().max().item(), scale=want.abs().max().item(), swap_effect=swap_effect,
                computed=computed)


def two_call_needs_cfg_degree_2() -> str:
    """A two-call family over 4 CFG groups (there are only 2 branches): the same error on every rank."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    ensure_layout(4, 1, 1)
    pipe, options = _pipeline("wan", 4)
    enable_sequence_parallel(pipe.transformer)
    try:
        with torch.no_grad():
            _generate(pipe, options, _embeddings("wan"), steps=1)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("a two-call pipeline ran over 4 CFG groups")


def batch_not_divisible() -> str:
    """A batched family whose guided batch (2 rows) is split over 4 CFG groups: the same error on every rank."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    ensure_layout(4, 1, 1)
    pipe, options = _pipeline("cogvideox", 4)
    enable_sequence_parallel(pipe.transformer)
    try:
        with torch.no_grad():
            _generate(pipe, options, _embeddings("cogvideox"), steps=1)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("a batch of 2 was split over 4 CFG groups")


def guidance_off_is_refused() -> str:
    """A two-call family with guidance off calls once per step: the second step's call differs in its latents,
    so CFG parallelism refuses it (rather than leave one group idle or pair the wrong calls)."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    ensure_layout(2, 2, 1)
    pipe, options = _pipeline("wan", 4)
    enable_sequence_parallel(pipe.transformer)
    try:
        with torch.no_grad():
            _generate(pipe, dict(options, guidance_scale=1.0), _embeddings("wan"), steps=2)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("CFG parallelism accepted a pipeline without guidance")


def new_prompt_relearns() -> dict:
    """A second pipeline call with other prompts on the same enabled model: its branches are learned again, and
    the result still equals the one-process run."""
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    ensure_layout(2, 1, 2)
    pipe, options = _pipeline("wan", 6)
    enable_sequence_parallel(pipe.transformer)
    with torch.no_grad():
        _generate(pipe, options, _embeddings("wan"))
        swapped = _swap(_embeddings("wan"))
        got = _generate(pipe, options, swapped)
    reference, _ = _pipeline("wan", 6)
    with torch.no_grad():
        want = _generate(reference, options, swapped)
    return dict(error=(got - want).abs().max().item(), scale=want.abs().max().item())


def agreement_over_the_unit() -> list:
    """Ranks 0 and 2 lead the two SP groups and ask for different backends: rank 0's request is the one every
    rank of both CFG groups follows (one agreement over the CFG unit, not one per SP group)."""
    import usp_attn

    usp_attn.destroy_sequence_parallel()
    request = "torch_sdpa" if dist.get_rank() == 0 else "fa"
    state = usp_attn.init_sequence_parallel(2, 1, cfg_degree=2, attention_backend=request)
    return [str(state.agreement.requested), str(state.backend), state.agreement.world_size]


def guard_per_sp_group() -> dict:
    """The argument check runs inside each SP group: a wrong head count on rank 3 fails CFG group 1 (ranks 2, 3)
    with the guard's error naming the ranks, while CFG group 0 (ranks 0, 1) runs its layer normally."""
    import usp_attn

    state = ensure_layout(2, 2, 1, validate=True)
    x = usp_attn.shard_sequence(torch.randn(1, 20, 4, 8))
    q = torch.randn(1, x.shape[1], 3, 8) if dist.get_rank() == 3 else x
    try:
        out = usp_attn.USPAttention(4, 8)(q, x, x)
    except ValueError as exc:
        result = dict(cfg_rank=state.cfg_rank, error=str(exc))
    else:
        result = dict(cfg_rank=state.cfg_rank, error=None, shape=tuple(out.shape))
    usp_attn.destroy_sequence_parallel()
    return result
