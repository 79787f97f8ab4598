"""``fa``: FlashAttention, in the generations installed and runnable on this GPU.

    generation  package (entry point)                  GPUs                 head sizes D (fp16/bf16)
    FA4         ``flash_attn.cute.flash_attn_func``    SM80, SM90, SM100,   SM90: 8..256; SM100/110:
                (PyPI ``flash-attn-4``, CuTe DSL)      SM110, SM120         8..128 or 256; else <= 256
    FA3         ``flash_attn_interface.flash_attn_func``  SM90 (Hopper)     <= 256
    FA2         ``flash_attn.flash_attn_func``          SM80+, ROCm build   <= 256
    (all: multiples of 8)

FA4's limits are its own ``interface._validate_head_dims`` (it checks SM90 and SM100/110
only; elsewhere we apply FA2's). Each generation returns the log-sum-exp its own way, and
every path here returns it as fp32 ``[B, H, S_q]``:

    FA4  ``flash_attn_func(..., return_lse=True) -> (out, lse)``; ``(out, None)`` without it
    FA3  ``flash_attn_func(..., return_attn_probs=True) -> (out, lse)``; releases without that
         argument always return ``(out, lse)``
    FA2  ``flash_attn_func(..., return_attn_probs=True) -> (out, lse, S_dmask)``

All take ``[B, S, H, D]`` natively and support GQA and causal. None takes an arbitrary
mask; masked calls go to a backend that does (the layer handles that). Packages are
imported on first use only.

FA4's forward launch is bound once per call signature (:mod:`usp_attn.backends.flash_bind`): its Python
decides the kernel and arguments at the first call, later calls launch that kernel directly.

Under ``torch.compile`` the call goes through one torch custom op
(``usp_attn::flash_attn_forward``, registered on first use): the kernels are Python that
dynamo cannot trace (FA4 is JIT-compiled CuTe DSL), and an opaque op keeps
``fullgraph=True`` working. Eager calls skip the op's dispatch cost.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from usp_attn.backends import flash_bind
from usp_attn.backends.base import HALF_DTYPES, AttentionBackend, default_scale, finite_lse
from usp_attn.backends.enum import AttentionBackendEnum
from usp_attn.backends.flash_backward import flash_backward

__all__ = [
    "FlashAttentionBackend", "flash_generation", "flash_generations", "generation_head_size_reason",
    "generation_head_sizes", "GENERATION_PACKAGES",
]

#: import name of each generation's package
GENERATION_PACKAGES = {"fa4": "flash_attn.cute", "fa3": "flash_attn_interface", "fa2": "flash_attn"}


def _arch_runs(generation: str, major: int) -> bool:
    if generation == "fa4":
        return major in (8, 9, 10, 11, 12)
    if generation == "fa3":
        return major == 9
    return major >= 8


def flash_generations(platform) -> tuple[str, ...]:
    """Generations installed and runnable on ``platform``, in the order ``fa`` prefers them.

    Hopper and newer: FA4, FA3, FA2 (FA4 matches FA3 on H200 and is the only one written
    for Blackwell). Ampere/Ada: FA2 first (FA4's SM80 path is not tuned yet).
    """
    kind = platform.kind.value
    if kind == "rocm":
        return ("fa2",) if platform.has_package("flash_attn") else ()
    if kind != "cuda" or platform.capability is None or platform.capability < (8, 0):
        return ()
    major = platform.capability[0]
    order = ("fa2", "fa4") if major == 8 else ("fa4", "fa3", "fa2")
    return tuple(g for g in order if platform.has_package(GENERATION_PACKAGES[g]) and _arch_runs(g, major))


def generation_head_size_reason(generation: str, platform, head_size: int) -> str | None:
    """Why ``generation`` cannot take head size ``head_size`` on ``platform`` (``None``: it can)."""
    major = platform.capability[0] if platform.capability else 0
    if generation == "fa4" and major in (10, 11):
        if not (8 <= head_size <= 128 and head_size % 8 == 0) and head_size != 256:
            return f"FA4 on SM{major}x takes head sizes 8..128 in multiples of 8, or 256, not {head_size}"
        return None
    if not (8 <= head_size <= 256 and head_size % 8 == 0):
        return f"{generation.upper()} takes head sizes 8..256 in multiples of 8, not {head_size}"
    return None


def generation_head_sizes(generation: str, platform) -> str:
    """The head sizes ``generation`` takes on ``platform``, as text (for ``usp-attn info``)."""
    major = platform.capability[0] if platform.capability else 0
    if generation == "fa4" and major in (10, 11):
        return "D 8..128 or 256, multiples of 8"
    return "D 8..256, multiples of 8"


def flash_generation(platform, head_size: int | None = None) -> str | None:
    """The generation ``fa`` runs on ``platform`` (for ``head_size``, if given), or ``None``."""
    for gen in flash_generations(platform):
        if head_size is None or generation_head_size_reason(gen, platform, head_size) is None:
            return gen
    return None


class FlashAttentionBackend(AttentionBackend):
    name = AttentionBackendEnum.FA
    platform_kinds = frozenset({"cuda", "rocm"})
    dtypes = HALF_DTYPES
    supports_gqa = True

    @classmethod
    def machine_reason(cls, platform):
        reason = super().machine_reason(platform)
        if reason:
            return reason
        cap = platform.capability
        if platform.kind.value == "cuda" and (cap is None or cap < (8, 0)):
            return f"fa needs compute capability >= 8.0, this GPU is {cap[0]}.{cap[1]}" if cap else "fa needs SM80+"
        if not flash_generations(platform):
            wanted = "flash_attn (ROCm build)" if platform.kind.value == "rocm" else _wanted_package(cap)
            problems = [f"{name}: {why}" for name, why in platform.unusable if name in GENERATION_PACKAGES.values()]
            return f"fa needs the {wanted} package, which is not installed" + (
                f" ({'; '.join(problems)})" if problems else "")
        return None

    @classmethod
    def head_size_reason(cls, platform, head_size):
        if flash_generation(platform, head_size) is not None:
            return None
        gens = flash_generations(platform) or ("fa2",)
        return "fa: " + "; ".join(generation_head_size_reason(g, platform, head_size) for g in gens)

    @classmethod
    def supports_lse(cls, platform) -> bool:
        return True

    @classmethod
    def block_sparse_reason(cls, platform):
        if flash_generation(platform) != "fa4":
            return "fa's block-sparse kernel is FlashAttention 4's (flash_attn.cute), which is not installed"
        cap = platform.capability or (0, 0)
        if cap[0] not in (9, 10, 11):
            return f"FlashAttention 4's block sparsity runs on SM90/SM100/SM110, this GPU is {cap[0]}.{cap[1]}"
        return None

    def forward_block_sparse(self, q, k, v, plan, *, softmax_scale=None):
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        rows = (q.shape[0],) + tuple(plan.full_cnt.shape[1:])
        cols = rows + plan.full_idx.shape[-1:]
        if plan.tiles is None:  # every kept block wholly kept: no mask function at all
            partial_cnt = torch.zeros(rows, dtype=torch.int32, device=q.device)
            partial_idx = torch.zeros(cols, dtype=torch.int32, device=q.device)
            extra = {}
        else:  # partly kept blocks: the pattern's tile table, read token by token inside them
            partial_cnt, partial_idx = plan.partial_cnt.expand(rows), plan.partial_idx.expand(cols)
            extra = {"mask_mod": _tile_table_mask_mod(), "aux_tensors": list(plan.tiles)}
        blocks = BlockSparseTensorsTorch(
            mask_block_cnt=partial_cnt, mask_block_idx=partial_idx,
            full_block_cnt=plan.full_cnt.expand(rows), full_block_idx=plan.full_idx.expand(cols),
            block_size=(plan.block, plan.block),
        )
        return self._function()(q, k, v, softmax_scale=softmax_scale, block_sparse_tensors=blocks, return_lse=True,
                                **extra)

    @classmethod
    def kernels(cls, platform, head_size, dtype, *, need_mask=False):
        if need_mask:
            return ()
        return tuple(g for g in flash_generations(platform)
                     if generation_head_size_reason(g, platform, head_size) is None)

    @classmethod
    def default_kernel(cls, platform, head_size):
        return flash_generation(platform, head_size)

    def __init__(self, platform, kernel=None):
        super().__init__(platform, kernel)
        self.generation = kernel or flash_generation(platform)
        self._fn = None
        self._fa3_has_lse_flag = True
        if self.generation is not None and not torch.compiler.is_compiling():
            _compiled_op()  # registered now, eagerly: dynamo cannot trace the registration

    def _function(self):
        if self._fn is None:
            fn = importlib.import_module(GENERATION_PACKAGES[self.generation]).flash_attn_func
            if self.generation == "fa3":
                try:
                    self._fa3_has_lse_flag = "return_attn_probs" in inspect.signature(fn).parameters
                except (TypeError, ValueError):  # a C function without a signature: assume today's API
                    self._fa3_has_lse_flag = True
            self._fn = fn
        return self._fn

    def forward(self, q, k, v, *, causal=False, softmax_scale=None, attn_mask=None, return_lse=False):
        if attn_mask is not None:
            raise ValueError("fa does not take attn_mask; route masked calls to torch_sdpa")
        if torch.compiler.is_compiling():
            scale = default_scale(q.shape[-1], softmax_scale)
            out, lse = _compiled_op()(q, k, v, self.generation, scale, causal, return_lse)
            return (out, lse) if return_lse else out
        return self.call(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse)

    def call(self, q, k, v, *, causal=False, softmax_scale=None, return_lse=False):
        """The generation's own function, with its LSE convention (see module doc)."""
        fn = self._function()
        if self.generation == "fa4":  # its launch bound once per signature (flash_bind.py)
            out, lse = flash_bind.launch(fn, q, k, v, softmax_scale=softmax_scale, causal=causal,
                                         return_lse=return_lse)
        elif self.generation == "fa3" and not self._fa3_has_lse_flag:
            res = fn(q, k, v, softmax_scale=softmax_scale, causal=causal)
            out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
        else:  # FA2 and today's FA3: the LSE comes with return_attn_probs
            res = fn(q, k, v, softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_lse)
            out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
        if not return_lse:
            return out
        if lse is None:
            raise RuntimeError(f"{self.generation.upper()} returned no log-sum-exp although it was requested")
        return out, lse

    # -- gradients: each generation's own backward kernel ------------------------------------
    @classmethod
    def supports_backward(cls, platform, kernel=None) -> bool:
        generation = kernel or flash_generation(platform)
        if generation == "fa4":  # FA4's backward kernels exist for SM90 and newer only
            return platform.capability is not None and platform.capability >= (9, 0)
        return generation is not None

    def backward(self, q, k, v, out, dout, lse, *, causal=False, softmax_scale=None, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("fa does not take attn_mask; route masked calls to torch_sdpa")
        scale = default_scale(q.shape[-1], softmax_scale)
        return flash_backward(self.generation, q, k, v, out, dout, finite_lse(lse), causal=causal, scale=scale)


_op = None
_tile_table_mask = None


def _tile_table_mask_mod():
    """FA4's ``mask_mod`` for partly kept blocks of a tile pattern: query ``m`` attends key ``n`` of
    head ``h`` iff ``table[h, q_tile[m], k_tile[n]]`` (aux tensors of
    :class:`usp_attn.sparse.attend.BlockPlan`). Made once: FA4 caches its kernels on the function."""
    global _tile_table_mask
    if _tile_table_mask is None:
        import cutlass
        import cutlass.cute as cute
        from flash_attn.cute import utils

        @cute.jit
        def tile_table_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            q_tile, k_tile, table = aux_tensors[0], aux_tensors[1], aux_tensors[2]
            keep = table[head[0], q_tile[m_idx[0]], k_tile[n_idx[0]]]
            return utils.scalar_to_ssa(keep, cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)

        _tile_table_mask = tile_table_mask
    return _tile_table_mask


def _compiled_op():
    """``usp_attn::flash_attn_forward(q, k, v, generation, scale, causal, return_lse) -> (out, lse)``,
    registered on first use (importing usp_attn registers nothing). ``lse`` is empty when not
    requested: a custom op's outputs must be tensors."""
    global _op
    if _op is None:
        from usp_attn.backends import make_backend
        from usp_attn.platforms import current_platform

        @torch.library.custom_op("usp_attn::flash_attn_forward", mutates_args=())
        def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, generation: str, scale: float,
                               causal: bool, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
            impl = make_backend(AttentionBackendEnum.FA, current_platform(), generation)
            # through forward, not call: the compiled graph hands over whatever strides it has
            res = impl.forward(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
            if return_lse:
                return res[0], res[1]
            return res, q.new_empty(0, dtype=torch.float32)

        @flash_attn_forward.register_fake
        def _(q, k, v, generation, scale, causal, return_lse):
            b, s, h, _ = q.shape
            lse_shape = (b, h, s) if return_lse else (0,)
            return q.new_empty(b, s, h, v.shape[-1]), q.new_empty(lse_shape, dtype=torch.float32)

        _op = flash_attn_forward
    return _op


def _wanted_package(capability) -> str:
    if capability and capability[0] >= 10:
        return "flash_attn.cute (FA4, pip install flash-attn-4) or flash_attn"
    if capability and capability[0] == 9:
        return "flash_attn.cute (FA4, pip install flash-attn-4), flash_attn_interface (FA3) or flash_attn"
    return "flash_attn (FA2) or flash_attn.cute (FA4)"
