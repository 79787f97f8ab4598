"""Sequence-parallel attention layers: ``USPAttention`` (Ulysses x ring) and its special cases.

Data flow for one call on SP rank ``r = ring_rank * U + ulysses_rank``, with local
shards ``q [B, n_pre + s_r + n_suf, H, D]`` and ``k, v [B, kv_pre + n_pre + s_r + n_suf +
kv_suf, H_kv, D]`` (``n_pre``/``n_suf`` replicated tokens, identical on every rank, e.g. text;
``kv_pre``/``kv_suf`` replicated keys/values without queries; see :mod:`usp_attn.arguments`):

1. Ulysses (U > 1): one fused all-to-all turns the ``s_r`` sharded tokens of all heads
   into the whole group segment (``S_seg`` tokens) of head block ``ulysses_rank``. The
   replicated tokens skip the all-to-all: they are sliced to the same head block
   locally and written into rows reserved around the segment (no extra copy)
   (:mod:`usp_attn.ulysses.steps`; causal on the zigzag layout also reorders the segment).
2. Ring (R > 1): the segment's queries (and the replicated queries) attend every ring
   rank's segment K/V, passed around the ring; the replicated K/V is attended once,
   locally. R == 1: one kernel call over [replicated + segment] keys. Causal: the
   per-hop calls of :mod:`usp_attn.ring.plan` (contiguous or zigzag layout).
3. Ulysses back: the inverse all-to-all returns ``[B, s_r, H, D]``; replicated-token
   outputs are all-gathered over heads (taking ring rank 0's copy, so every rank
   returns bit-identical replicated outputs). With ``return_lse`` the log-sum-exp
   ``[B, H, rows]`` takes the same way back (its own, D times smaller all-to-all).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn

from usp_attn import masks
from usp_attn.arguments import (
    ReplicatedRows,
    check_group_device,
    check_load_balance,
    check_positive_int,
    check_qkv,
    check_return_lse,
    check_seq_len,
    check_shard_length,
    check_zigzag_sizes,
)
from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum
from usp_attn.distributed.guard import CallSignature
from usp_attn.distributed.collectives_grad import gather_replicated_with_grad, share_replicated_grads
from usp_attn.ring.exchange import DirectExchange, RingExchange
from usp_attn.distributed.sharding import exchange_lengths
from usp_attn.distributed.state import SequenceParallelState, get_sequence_parallel_state
from usp_attn.distributed.zigzag import rank_chunks
from usp_attn.ring.plan import ring_front_lengths
from usp_attn.kernels import BlockKernels, check_backward, grad_required
from usp_attn.ulysses.heads import HeadPlan
from usp_attn.layers import compiled
from usp_attn.layers.local import LocalAttention
from usp_attn.ring.forward import ring_attention
from usp_attn.layers.replicated import attend_with_masked_replicated_keys
from usp_attn.ring.backward import RingPlan, ring_attention_with_grad
from usp_attn.ulysses import pipelined
from usp_attn.ulysses.steps import UlyssesSteps
from usp_attn.selector import AttentionBackendUnavailableError, settings_version
from usp_attn.sparse.attend import attend_sparse, check_sparsity, hop_backward, segments_read
from usp_attn.sparse.balance import head_order
from usp_attn.sparse.gate import judge, sample_rows
from usp_attn.sparse.patterns import SparsityPattern

__all__ = ["USPAttention", "UlyssesAttention", "RingAttention"]


@dataclasses.dataclass(frozen=True)
class _Call:
    """One sequence-parallel call after its checks: what the steps of the forward read."""

    rows: ReplicatedRows
    sizes: tuple[int, ...]  # every SP rank's shard length, in SP-rank order
    balanced: bool  # the zigzag layout
    key_mask: torch.Tensor | None  # [B, S_local_k]
    text_mask: torch.Tensor | None  # [B, replicated keys]
    return_lse: bool
    signature: CallSignature
    grad: bool = False
    sparsity: SparsityPattern | None = None
    head_order: tuple[int, ...] | None = None  # Ulysses head permutation balancing sparse work

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def group_sizes(self, state) -> tuple[int, ...]:
        """The shard lengths of this rank's Ulysses group (its segment)."""
        u, r = state.ulysses_degree, state.ring_rank
        return self.sizes[r * u : (r + 1) * u]

    def segment(self, state) -> int:
        return sum(self.group_sizes(state))


class USPAttention(nn.Module):
    """Attention over a sequence sharded across the sequence-parallel group (Ulysses x ring).

    Args:
        num_heads, head_size, num_kv_heads, softmax_scale, causal,
        supported_attention_backends: as :class:`~usp_attn.LocalAttention`.
        skip_sequence_parallel: cross-attention mode: q is the local shard, k/v are
            full on every rank; no communication at all.
        state: the :class:`SequenceParallelState` to use (default: the global one at
            call time; none initialised = a single rank, i.e. ``LocalAttention``).
        ulysses_pipeline: head groups the Ulysses all-to-alls are pipelined over, each group's
            transfers overlapping another's attention (:mod:`usp_attn.ulysses.pipelined`): ``None``
            (default) measured per call class on CUDA, 1 on the CPU; ``1`` off; an int ``G``: that
            many (at most the heads per Ulysses rank). Inference calls without the LSE only; the
            output is the unpipelined output bit for bit.

    Shapes (``forward``):
        q: ``[B, n_pre + s_r + n_suf, H, D]``, this rank's shard ``s_r`` of the sequence with
        the replicated tokens around it (``num_replicated_prefix/suffix``).
        k, v: ``[B, kv_pre + n_pre + s_r + n_suf + kv_suf, H_kv, D]``: the same rows plus
        ``num_replicated_kv_prefix/suffix`` replicated keys/values without queries, outermost.
        Output: same shape as q; the replicated tokens' output is complete on every rank.
        attn_mask: optional key mask over k's rows, ``[B, S_local_k]`` or ``[B, 1, 1, S_local_k]``,
        bool (True = attend) or additive float (0 / -inf; any finite bias is added). Per-query
        forms are accepted only with ``skip_sequence_parallel`` or on a single rank.
        replicated_key_mask: instead of ``attn_mask``, a key mask over the replicated keys only,
        ``[B, n]`` or ``[B, 1, 1, n]`` with ``n`` = replicated k rows (prefix rows, then suffix
        rows), bool or additive; every sharded key is attended. For text padding in joint
        attention: the sharded keys then run on the fastest kernel (FA4 and cuDNN take no
        mask) and only the replicated keys on a masked one, merged by LSE (exact).
        seq_len: global length of the sharded part (default: the length recorded by
        :func:`~usp_attn.shard_sequence`; if none was recorded, lengths are exchanged).
        return_lse: also return the log-sum-exp ``[B, H, q rows]`` (fp32; fp64 for fp64 inputs)
        of this rank's query rows, replicated rows included in their order; differentiable.
        load_balance: the layout of the shards (``None``: the one recorded on the state by
        ``shard_sequence``); ``True`` = zigzag, which balances causal work.
        replicated: the replicated rows as one :class:`~usp_attn.ReplicatedRows` description,
        instead of the ``num_replicated_*`` integer keywords (shorthand for the same counts).
        sparsity: a sparse pattern (:mod:`usp_attn.sparse`) over the grid of the whole sharded sequence (in
        the pattern's token order), or ``None`` (dense, the default); lossy and opt-in. The same pattern on
        every rank; each Ulysses rank applies its heads' part, each ring hop its part. Not with causal,
        ``attn_mask``, ``replicated_key_mask`` or the zigzag layout; dynamic patterns not under ring.
        Differentiable in every layout (the exact masked path under autograd).
    """

    #: (ulysses_degree, ring_degree) constraint checked at call time; None = any.
    _required_layout: str | None = None

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends=None,
        skip_sequence_parallel: bool = False,
        *,
        state: SequenceParallelState | None = None,
        sparse_gate=None,
        ulysses_pipeline: int | None = None,
    ) -> None:
        super().__init__()
        self.local = LocalAttention(
            num_heads, head_size, num_kv_heads, softmax_scale, causal, supported_attention_backends,
            sparse_gate=sparse_gate,
        )
        self.num_heads, self.head_size = self.local.num_heads, self.local.head_size
        self.num_kv_heads, self.causal = self.local.num_kv_heads, self.local.causal
        self.skip_sequence_parallel = bool(skip_sequence_parallel)
        self._state = state
        self._checked_layouts: set = set()
        if state is not None:
            self._check_state(state)
        self._op_id = compiled.register(self)  # how the compiled graph's op finds this layer
        self.ulysses_pipeline = None if ulysses_pipeline is None else check_positive_int("ulysses_pipeline",
                                                                                         ulysses_pipeline)

    def __setstate__(self, state) -> None:  # a copy (deepcopy, pickle) is another layer: its own op id
        super().__setstate__(state)
        self._op_id = compiled.register(self)

    # ---- configuration -------------------------------------------------------------------
    @property
    def state(self) -> SequenceParallelState | None:
        return self._state or get_sequence_parallel_state()

    def _check_state(self, state: SequenceParallelState) -> None:
        key = (id(state), state.ulysses_degree, state.ring_degree)
        if key in self._checked_layouts:
            return
        if self._required_layout == "ulysses" and state.ring_degree != 1:
            raise ValueError(
                f"UlyssesAttention needs ring_degree == 1, got ring_degree={state.ring_degree}; use USPAttention"
            )
        if self._required_layout == "ring" and state.ulysses_degree != 1:
            raise ValueError(
                f"RingAttention needs ulysses_degree == 1, got ulysses_degree={state.ulysses_degree}; "
                "use USPAttention"
            )
        if state.ring_degree > 1 and not self.skip_sequence_parallel:
            # Ring merging needs each block's log-sum-exp. An explicit backend that could run
            # here but cannot return it is a configuration error, not a reason to fall back.
            sel = self.local.selection(torch.bfloat16, need_lse=True)
            requested = sel.requested
            if requested is not None and requested != sel.backend:
                kernel = BACKEND_CLASSES[requested]
                if kernel.machine_reason(sel.platform) is None and not kernel.supports_lse(sel.platform):
                    raise AttentionBackendUnavailableError(
                        f"ring attention needs a backend that returns the log-sum-exp; '{requested}' does not "
                        f"on {sel.platform.describe()}. Choose fa or torch_sdpa, or leave the backend on auto."
                    )
        self._checked_layouts.add(key)

    @property
    def backend(self) -> AttentionBackendEnum:
        """The backend that runs the local blocks (needs LSE when ring_degree > 1)."""
        state = self.state
        need_lse = state is not None and state.ring_degree > 1 and not self.skip_sequence_parallel
        dtype = self.local._last.dtype if self.local._last is not None else torch.get_default_dtype()
        return self.local.selection(dtype, need_lse=need_lse).backend

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        num_replicated_prefix: int = 0,
        num_replicated_suffix: int = 0,
        *,
        seq_len: int | None = None,
        return_lse: bool = False,
        num_replicated_kv_prefix: int = 0,
        num_replicated_kv_suffix: int = 0,
        load_balance: bool | None = None,
        replicated_key_mask: torch.Tensor | None = None,
        replicated: ReplicatedRows | None = None,
        sparsity: SparsityPattern | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        rows = ReplicatedRows.of(replicated, num_replicated_prefix, num_replicated_suffix, num_replicated_kv_prefix,
                                 num_replicated_kv_suffix)
        if self.skip_sequence_parallel or state is None or state.world_size == 1:
            return self._forward_one_rank(q, k, v, attn_mask, rows, return_lse, load_balance, replicated_key_mask,
                                          sparsity)
        if torch.compiler.is_compiling() and sparsity is None and not grad_required(q, k, v):
            # One opaque op in the graph; at run time it runs this forward eagerly (layers/compiled.py).
            return compiled.sp_attention(self._op_id, q, k, v, attn_mask, replicated_key_mask, rows, seq_len,
                                         return_lse, load_balance)
        call = self._checked_call(state, q, k, v, attn_mask, rows, seq_len, return_lse, load_balance,
                                  replicated_key_mask, sparsity)  # the same verdict on every rank
        recording = state.guard.start_recording() if call.grad else None  # backward failures named too
        try:
            if call.grad:  # training: every step below is recorded with its adjoint
                q, k, v = self._for_training(state, call, q, k, v)
            groups = self._pipeline_groups(state, call, q, k, v)
            if groups > 1:  # the Ulysses steps overlapped with attention over head groups (ulysses/pipelined.py)
                return self._pipelined(state, call, q, k, v, groups)
            # 1. Ulysses: sequence shard -> head shard of the whole segment (replicated rows reserved around it).
            ulysses = self._ulysses(state, call)
            q_all, k_all, v_all, key_mask = ulysses.to_heads(q, k, v, call.key_mask) if ulysses else (q, k, v,
                                                                                                       call.key_mask)
            # 2. Attention over the whole sequence: one call (R == 1) or the ring (R > 1).
            out_all, lse_all = self._attend(state, call, q_all, k_all, v_all, key_mask)
            # 3. Back to sequence shards; replicated outputs gathered over heads. The LSE goes the same way.
            return self._back(state, call, ulysses, out_all, lse_all)
        except Exception as exc:  # reported for the peers (any failure); a failed collective names the rank behind it
            state.guard.raise_named(exc, "USPAttention.forward", lambda: call.signature.summary(self))
        finally:
            if recording is not None:
                state.guard.stop_recording(recording)

    def _forward_one_rank(self, q, k, v, attn_mask, rows, return_lse, load_balance, text_mask, sparsity):
        check_return_lse(return_lse)
        check_load_balance(load_balance)
        if sparsity is not None:
            if self.skip_sequence_parallel:
                raise ValueError("sparsity= is for self-attention over the video grid; this layer is "
                                 "skip_sequence_parallel (cross-attention)")
            if text_mask is not None:
                raise ValueError("sparsity= cannot be combined with replicated_key_mask")
            return self.local(q, k, v, attn_mask, return_lse=return_lse, sparsity=sparsity, replicated=rows)
        shaped = all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (q, k))
        if rows.any and shaped:  # cross-attention's k/v are complete: any row count of theirs is right
            rows.check_rows(q.shape[1], None if self.skip_sequence_parallel else k.shape[1], self.causal)
        elif rows.any:
            rows.check_counts(self.causal)
        if text_mask is not None and shaped:  # one call: the mask over every key
            text = masks.replicated_key_mask(text_mask, q, rows, attn_mask, grad_required(q, k, v))
            attn_mask = masks.full_key_mask(text, rows, k.shape[1])
        return self.local(q, k, v, attn_mask, return_lse=return_lse)

    def _for_training(self, state, call: _Call, q, k, v):
        """Refuse a kernel without a backward before any collective; replicated rows' gradients
        become their mean over the group (see distributed/collectives_grad)."""
        sparse = call.sparsity is not None  # the exact masked path, with the LSE of its merges
        need_lse = state.ring_degree > 1 or call.return_lse or sparse
        check_backward(self.local.selection(q.dtype, need_mask=call.key_mask is not None or sparse,
                                            need_lse=need_lse).impl)
        rows = call.rows
        if not rows.any:
            return q, k, v
        k_pre, k_suf = rows.key_prefix, rows.key_suffix
        return share_replicated_grads((q, k, v), (rows.prefix, k_pre, k_pre), (rows.suffix, k_suf, k_suf),
                                      world=state.world_size, group=state.sp_group)

    def _checked_call(self, state, q, k, v, attn_mask, rows, seq_len, return_lse, load_balance, text_mask,
                      sparsity=None) -> _Call:
        """Check the arguments; on a first or changed call the guard makes every rank raise the
        same error or none. Host-only; in steady state no check and no communication."""
        self._check_state(state)
        layout_arg = state.load_balance if load_balance is None else load_balance
        balanced = layout_arg is True
        total = seq_len if seq_len is not None else state.sequence_length
        signature = CallSignature.of(q, k, v, attn_mask, rows.prefix, rows.suffix, total, return_lse=return_lse,
                                     num_replicated_kv_prefix=rows.kv_prefix, num_replicated_kv_suffix=rows.kv_suffix,
                                     load_balance=layout_arg, replicated_key_mask=text_mask is not None,
                                     sparsity=sparsity)
        agreed = self.__dict__.get("_agreed")
        agreed = agreed[1] if agreed is not None and agreed[0] is state.guard else None
        reason = state.guard.check_reason(agreed, signature)
        unmasked = attn_mask is None and text_mask is None
        steady = self.__dict__.get("_steady_call")
        if reason is None and unmasked and steady is not None and steady[0] is state.guard \
                and steady[1].signature == signature:
            # The checks below read what the signature holds (shapes, dtypes, devices, counts, the global
            # length, layout, pattern, gradients): the last call with this signature passed them. The scalars,
            # whose types the signature does not pin (True == 1), are checked again.
            check_return_lse(return_lse)
            check_load_balance(load_balance)
            check_seq_len(seq_len)
            rows.check_counts(self.causal)
            return steady[1]
        error, local_len, sizes, key_mask = None, None, None, None
        try:
            check_qkv(q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      head_size=self.head_size, causal=False)
            check_group_device(q, state.sp_group)
            check_return_lse(return_lse)
            check_load_balance(load_balance)
            check_seq_len(seq_len)
            local_len = rows.check_rows(q.shape[1], k.shape[1], self.causal)
            grad = grad_required(q, k, v)
            key_mask = masks.sp_key_mask(attn_mask, q, k, grad)
            text_mask = masks.replicated_key_mask(text_mask, q, rows, attn_mask, grad)
            if total is not None:
                sizes = check_shard_length(state, total, balanced, local_len, q.shape[1], rows)
            if sparsity is not None:
                self._check_sparse_call(sparsity, attn_mask, text_mask, balanced, total, state)
        except (ValueError, TypeError) as exc:
            if reason is None:
                raise
            error = str(exc)
        if reason is not None:  # every rank raises the same error here, or none does
            lengths = state.guard.check(self, signature, agreed, reason, error, local_len, "USPAttention.forward")
            if lengths is not None:
                self.__dict__["_agreed"] = (state.guard, signature)  # nn.Module.__setattr__ is slow
                sizes = sizes or tuple(lengths)
        sizes = tuple(sizes or exchange_lengths(local_len, state))
        if balanced:
            check_zigzag_sizes(state, sizes)  # the same tuple everywhere: the same verdict
        if sparsity is not None and total is None:  # the grid's length is only known now
            sparsity.check(sum(sizes), self.num_heads)
        order = None if sparsity is None else head_order(sparsity, self.num_heads, self.num_kv_heads,
                                                          state.ulysses_degree)
        call = _Call(rows, sizes, balanced, key_mask, text_mask, return_lse, signature, grad_required(q, k, v),
                     sparsity, order)
        if unmasked and total is not None:  # sizes from the global length, not exchanged: reusable as they are
            self.__dict__["_steady_call"] = (state.guard, call)  # nn.Module.__setattr__ is slow
        return call

    def _check_sparse_call(self, sparsity, attn_mask, text_mask, balanced, total, state) -> None:
        where = "USPAttention"
        check_sparsity(sparsity, num_grid_tokens=total, num_heads=self.num_heads, causal=self.causal, where=where)
        if attn_mask is not None or text_mask is not None:
            raise ValueError(f"{where}: sparsity= cannot be combined with attn_mask or replicated_key_mask")
        if balanced:
            raise ValueError(f"{where}: sparsity= needs the contiguous layout; the zigzag layout (load_balance=True) "
                             "is for causal attention")
        if sparsity.dynamic and state.ring_degree > 1:
            raise ValueError(
                f"{where}: {type(sparsity).__name__} is dynamic: it chooses key blocks from the whole sequence's "
                "pooled keys, which a ring rank does not hold (ring_degree > 1); run it with Ulysses only "
                "(ring_degree=1), or use a static pattern such as SlidingTileSparsity under ring")

    def _pipeline_groups(self, state, call: _Call, q, k, v) -> int:
        """How many head groups this call's Ulysses steps run in (1: not pipelined)."""
        setting = self.ulysses_pipeline
        if setting == 1 or state.ulysses_degree == 1 or call.grad or call.sparsity is not None or call.return_lse:
            return 1
        local_heads = -(-self.num_heads // state.ulysses_degree)
        if setting is not None:
            return min(setting, local_heads)
        chosen = self.__dict__.get("_pipeline")
        if chosen is not None and chosen[0] is call:
            return chosen[1]
        plan = HeadPlan.make(self.num_heads, self.num_kv_heads, state.ulysses_degree)
        u_deg = state.ulysses_degree
        longest = max(sum(call.sizes[g * u_deg : (g + 1) * u_deg]) for g in range(state.ring_degree))
        rows = call.rows.prefix + longest + call.rows.suffix
        counts = pipelined.candidate_counts(plan, q.shape[0], rows, q.device)
        # The same on every SP rank (never a rank's own shard): they all decide at this call, together, since
        # under the ring every Ulysses group must run the same groups (each group runs its own ring).
        key = (self.num_heads, self.num_kv_heads, self.head_size, self.causal, q.dtype, q.shape[0], call.sizes,
               call.rows, call.balanced, call.key_mask is not None, call.text_mask is not None, state.ulysses_degree,
               state.ring_degree, state.generation)

        def run(count):
            return self._pipelined(state, call, q, k, v, count) if count > 1 else self._unpipelined(state, call, q,
                                                                                                      k, v)

        count = pipelined.choose_group_count(key, run, counts, state.sp_group, q.device)
        self.__dict__["_pipeline"] = (call, count)  # nn.Module.__setattr__ is slow
        return count

    def _pipelined(self, state, call: _Call, q, k, v, groups: int):
        def attend(q_all, k_all, v_all, key_mask):
            return self._attend(state, call, q_all, k_all, v_all, key_mask)[0]

        return pipelined.run_pipelined(self._ulysses(state, call), q, k, v, call.key_mask, groups, attend,
                                       functools.partial(self._gather_replicated, state))

    def _unpipelined(self, state, call: _Call, q, k, v):
        ulysses = self._ulysses(state, call)
        q_all, k_all, v_all, key_mask = ulysses.to_heads(q, k, v, call.key_mask)
        out_all, lse_all = self._attend(state, call, q_all, k_all, v_all, key_mask)
        return self._back(state, call, ulysses, out_all, lse_all)

    def _ulysses(self, state, call: _Call) -> UlyssesSteps | None:
        u_deg = state.ulysses_degree
        if u_deg == 1:
            return None  # U == 1: the rank's rows (contiguous, or [c_r | c_2W-1-r] zigzag) are in global order
        made = self.__dict__.get("_steady_steps")
        if made is not None and made[0] is call:  # the steady call again: the same steps
            return made[1]
        steps = self._make_ulysses(state, call)
        self.__dict__["_steady_steps"] = (call, steps)
        return steps

    def _make_ulysses(self, state, call: _Call) -> UlyssesSteps:
        u_deg = state.ulysses_degree
        r_rank, world = state.ring_rank, state.world_size
        # Causal on the zigzag layout: the segment in global order [F_g | B_g] (see distributed/zigzag).
        zigzag = call.balanced and self.causal
        pieces = [rank_chunks(call.total, world, r_rank * u_deg + u) for u in range(u_deg)] if zigzag else None
        return UlyssesSteps(HeadPlan.make(self.num_heads, self.num_kv_heads, u_deg, call.head_order),
                            call.group_sizes(state),
                            state.ulysses_rank, state.ulysses_group, call.rows, pieces, call.grad)

    def _attend(self, state, call: _Call, q_all, k_all, v_all, key_mask):
        """``(out, lse or None)`` of the rank's queries over every key. A mask on the replicated keys
        only: the sharded keys unmasked on the fast kernel, the replicated ones masked on a kernel
        that takes masks (masked calls are never measured: no collective)."""
        if call.sparsity is not None:
            return self._attend_sparse(state, call, q_all, k_all, v_all)
        rows, seg, return_lse = call.rows, call.segment(state), call.return_lse
        split = call.text_mask is not None
        chosen = self.__dict__.get("_steady_kernel")
        if chosen is not None and chosen[0] is call and chosen[1] == settings_version():
            kernel = chosen[2]  # the steady call again, no selection setting changed: the same kernel
        else:
            kernel = self._kernel(state, q_all, k_all, v_all, key_mask is not None, rows, call.sizes, return_lse,
                                  split)
            self.__dict__["_steady_kernel"] = (call, settings_version(), kernel)
        kernels = BlockKernels(self.local, kernel)
        text_k = text_v = None
        if split:
            text_k, text_v = (_replicated(t, rows.key_prefix, seg) for t in (k_all, v_all))
            kernels.masked_kernel = self.local.kernel_for(q_all, text_k, text_v, need_mask=True, need_lse=True)
        if state.ring_degree > 1:
            result = self._ring(state, call, q_all, k_all, v_all, key_mask, kernels)()
        elif split:
            own = slice(rows.key_prefix, rows.key_prefix + seg)
            result = attend_with_masked_replicated_keys(kernels, q_all, k_all[:, own], v_all[:, own], text_k, text_v,
                                                        call.text_mask, return_lse=return_lse)
        else:
            result = self.local.attend(q_all, k_all, v_all, mask=masks.key_mask_4d(key_mask), causal=self.causal,
                                       kernel=kernel, return_lse=return_lse)
        return result if return_lse else (result, None)

    def _attend_sparse(self, state, call: _Call, q_all, k_all, v_all):
        """The pattern, or dense attention where the accuracy gate (if any) rejected it for this call's
        shape class; the gate judges the first call of each class (usp_attn.sparse.gate)."""
        gate = self.local.sparse_gate
        verdicts = self.local._gate_verdicts
        verdict = None if gate is None else verdicts.get(call.signature)
        if verdict is False:
            return self._attend(state, dataclasses.replace(call, sparsity=None), q_all, k_all, v_all, None)
        out, lse = self._sparse_result(state, call, q_all, k_all, v_all)
        if gate is None or verdict:
            return out, lse
        rows = call.rows
        picked = sample_rows(rows.prefix, q_all.shape[1] - rows.prefix - rows.suffix, gate, q_all.device)
        with torch.no_grad():
            dense = self._dense_rows(state, call, q_all[:, picked], k_all, v_all)
        verdicts[call.signature] = judge(gate, out[:, picked], dense, state.sp_group, str(call.sparsity))
        if verdicts[call.signature]:
            return out, lse
        return self._attend(state, dataclasses.replace(call, sparsity=None), q_all, k_all, v_all, None)

    def _dense_rows(self, state, call: _Call, q_rows, k_all, v_all):
        """Dense attention of some grid query rows over every key of the call (under ring: one pass)."""
        if state.ring_degree == 1:
            return self.local._attend_lse(q_rows, k_all, v_all)[0]
        rows, seg, u_deg = call.rows, call.segment(state), state.ulysses_degree
        lengths = tuple(sum(call.sizes[r * u_deg : (r + 1) * u_deg]) for r in range(state.ring_degree))
        own = slice(rows.key_prefix, rows.key_prefix + seg)
        text = () if not (rows.key_prefix or rows.key_suffix) else \
            ((_replicated(k_all, rows.key_prefix, seg), _replicated(v_all, rows.key_prefix, seg), None),)
        exchange = RingExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout)
        return ring_attention(self.local.attend, q_rows, k_all[:, own], v_all[:, own], exchange=exchange,
                              ring_rank=state.ring_rank, block_lengths=lengths, local_blocks=text)

    def _sparse_result(self, state, call: _Call, q_all, k_all, v_all):
        """The pattern over this rank's heads: one call (R == 1) or the ring with each hop's part
        of the pattern (a hop the pattern leaves empty makes no kernel call)."""
        u_deg, r_deg, rows = state.ulysses_degree, state.ring_degree, call.rows
        plan = HeadPlan.make(self.num_heads, self.num_kv_heads, u_deg, call.head_order)
        heads = plan.heads_of(state.ulysses_rank) if u_deg > 1 else tuple(range(self.num_heads))
        block_kernel = self.local._block_kernel(q_all, k_all, v_all)
        scale = self.local.softmax_scale
        if r_deg == 1:
            out, lse = attend_sparse(self.local._attend_lse, q_all, k_all, v_all, call.sparsity,
                                     q_text=(rows.prefix, rows.suffix), k_text=(rows.key_prefix, rows.key_suffix),
                                     q_range=(0, call.total), k_range=(0, call.total), heads=heads, scale=scale,
                                     block_kernel=block_kernel)
            return out, (lse if call.return_lse else None)
        lengths = tuple(sum(call.sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        starts = [sum(lengths[:r]) for r in range(r_deg)]
        spans = [(s, s + n) for s, n in zip(starts, lengths)]
        hop = _SparseHop(self.local._attend_lse, call.sparsity, rows, state.ring_rank, spans, heads, scale,
                         block_kernel, q_all.device)
        seg, k_pre = call.segment(state), rows.key_prefix
        own = slice(k_pre, k_pre + seg)
        text_k = text_v = None
        if rows.key_prefix or rows.key_suffix:  # text K/V: attended densely once, here
            text_k, text_v = _replicated(k_all, k_pre, seg), _replicated(v_all, k_pre, seg)
        if call.grad:  # the ring's backward sends every block around the ring again, with its dk/dv
            kernels = BlockKernels(self.local, self.local.kernel_for(q_all, k_all, v_all, need_lse=True),
                                   self.local.kernel_for(q_all, k_all, v_all, need_mask=True, need_lse=True))
            plan = _training_ring_plan(state, kernels, lengths, False, sparse_hop=hop)
            out, lse = ring_attention_with_grad(plan, q_all, k_all[:, own], v_all[:, own], text_k=text_k,
                                                text_v=text_v, return_lse=True)
            return out, (lse if call.return_lse else None)
        exchange = RingExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout) \
            if hop.needs is None else \
            DirectExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout, hop.needs)
        result = ring_attention(self.local.attend, q_all, k_all[:, own], v_all[:, own], exchange=exchange,
                                ring_rank=state.ring_rank, block_lengths=lengths,
                                local_blocks=() if text_k is None else ((text_k, text_v, None),), return_lse=True,
                                sparse_hop=hop)
        out, lse = result
        return out, (lse if call.return_lse else None)

    def _back(self, state, call: _Call, ulysses, out_all, lse_all):
        n_pre, n_suf, seg = call.rows.prefix, call.rows.suffix, call.segment(state)
        out, lse = out_all[:, n_pre : n_pre + seg], None if lse_all is None else lse_all[:, :, n_pre : n_pre + seg]
        if ulysses is not None:
            out, lse = ulysses.to_sequence(out, lse)
        if n_pre or n_suf:
            text_out = self._gather_replicated(state, torch.cat([out_all[:, :n_pre], out_all[:, n_pre + seg :]], 1))
            out = torch.cat([text_out[:, :n_pre], out, text_out[:, n_pre:]], dim=1)
            if lse is not None:  # as [B, n_text, h, 1] rows, gathered over heads like the outputs
                text_lse = torch.cat([lse_all[:, :, :n_pre], lse_all[:, :, n_pre + seg :]], dim=2)
                text_lse = self._gather_replicated(state, text_lse.transpose(1, 2).unsqueeze(-1))[..., 0]
                lse = torch.cat([text_lse[:, :n_pre].transpose(1, 2), lse, text_lse[:, n_pre:].transpose(1, 2)], 2)
        if call.head_order is not None:  # heads were permuted to balance sparse work: back to the layer's order
            out, lse = ulysses.heads.restore(out), None if lse is None else ulysses.heads.restore(lse, dim=1)
        return (out, lse) if call.return_lse else out

    def _kernel(self, state, q_all, k_all, v_all, masked, rows, sizes, return_lse, split=False):
        """The kernel for every block of this call, chosen once per shape class for the group.

        The class is built from the longest segment, which every SP rank knows identically,
        so all ranks look up (and on a miss, measure on rank 0) the same class together.
        """
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        longest = max(sum(sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        seg = q_all.shape[1] - rows.prefix - rows.suffix
        if r_deg == 1 and not split:
            keys = slice(None)
            lengths = (rows.prefix + longest + rows.suffix, rows.key_prefix + longest + rows.key_suffix)
        else:  # ring blocks (or the sharded keys apart from the replicated): one segment's keys at a time
            keys = slice(rows.key_prefix, rows.key_prefix + seg)
            lengths = (rows.prefix + longest + rows.suffix, longest)
        return self.local.kernel_for(q_all, k_all[:, keys], v_all[:, keys], causal=self.causal, need_mask=masked,
                                     need_lse=r_deg > 1 or return_lse or split, lengths=lengths, group=state.sp_group)

    def _ring(self, state, call: _Call, q_all, k_all, v_all, key_mask, kernels):
        """The ring for this call, ready to run: ``functools.partial`` of the forward (or the
        autograd-recorded forward), so no frame of this method stays under the kernels."""
        u_deg, r_deg, rows, seg = state.ulysses_degree, state.ring_degree, call.rows, call.segment(state)
        block_lengths = tuple(sum(call.sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        fronts = ring_front_lengths(call.total, u_deg, r_deg) if call.balanced and self.causal else None
        k_pre = rows.key_prefix
        own = slice(k_pre, k_pre + seg)
        text_k = text_v = None
        text_mask = call.text_mask
        if rows.key_prefix or rows.key_suffix:  # replicated K/V: attended once, here, never passed around the ring
            text_k, text_v = _replicated(k_all, k_pre, seg), _replicated(v_all, k_pre, seg)
            if key_mask is not None:
                text_mask = _replicated(key_mask, k_pre, seg)
        own_mask = None if key_mask is None else key_mask[:, own]
        if call.grad:
            ring = _training_ring_plan(state, kernels, block_lengths, self.causal, fronts)
            return functools.partial(ring_attention_with_grad, ring, q_all, k_all[:, own], v_all[:, own],
                                     key_mask=own_mask, text_k=text_k, text_v=text_v, text_mask=text_mask,
                                     return_lse=call.return_lse)
        exchange = RingExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout)
        local_blocks = () if text_k is None else ((text_k, text_v, text_mask),)
        return functools.partial(
            ring_attention, kernels.attend, q_all, k_all[:, own], v_all[:, own],
            exchange=exchange, ring_rank=state.ring_rank, block_lengths=block_lengths, causal=self.causal,
            key_mask=own_mask, local_blocks=local_blocks, return_lse=call.return_lse, front_lengths=fronts,
        )

    def _gather_replicated(self, state, text_out):
        """``[B, n_text, h_local, D]`` -> ``[B, n_text, H, D]``, identical on every rank.

        Each ring rank merged the blocks in a different order, so their (equal up to
        rounding) copies differ in the last bits; everyone takes ring rank 0's.
        """
        if grad_required(text_out):
            return gather_replicated_with_grad(
                text_out, functools.partial(self._gather_replicated, state),
                ulysses_degree=state.ulysses_degree, ulysses_group=state.ulysses_group,
            )
        if state.ring_degree == 1:
            group, count = state.ulysses_group, state.ulysses_degree
        else:
            group, count = state.sp_group, state.world_size
        pieces = [torch.empty_like(text_out) for _ in range(count)]
        dist.all_gather(pieces, text_out.contiguous(), group=group)
        return torch.cat(pieces[: state.ulysses_degree], dim=2)[:, :, : self.num_heads]

    def extra_repr(self) -> str:
        return self.local.extra_repr() + f", skip_sequence_parallel={self.skip_sequence_parallel}"


class UlyssesAttention(USPAttention):
    """:class:`USPAttention` restricted to Ulysses (all-to-all over the Ulysses group; ring_degree must be 1)."""

    _required_layout = "ulysses"


class RingAttention(USPAttention):
    """:class:`USPAttention` restricted to the ring (K/V passed around the ring group; ulysses_degree must be 1)."""

    _required_layout = "ring"


class _SparseHop:
    """One ring hop's part of a sparse pattern: this rank's rows against the source's segment."""

    def __init__(self, attend, pattern, rows, ring_rank, spans, heads, scale, block_kernel, device) -> None:
        self.attend, self.pattern, self.q_span, self.spans = attend, pattern, spans[ring_rank], spans
        self.heads, self.scale, self.block_kernel, self.device = heads, scale, block_kernel, device
        self.ring_rank = ring_rank
        self.q_text = (rows.prefix, rows.suffix)  # the hop's keys are grid keys only (text keys: the local block)
        # Which segments every ring rank reads: text queries attend every key. Every rank derives it from
        # the agreed pattern and spans (and the heads of its Ulysses position, which its ring shares).
        self.needs = None if any(self.q_text) else segments_read(pattern, tuple(spans), heads, device)

    def has_work(self, source: int) -> bool:
        return self.needs is None or self.needs[self.ring_rank][source]

    def __call__(self, source, q, k, v):
        return attend_sparse(self.attend, q, k, v, self.pattern, q_text=self.q_text, k_text=(0, 0), q_range=self.q_span,
                             k_range=self.spans[source], heads=self.heads, scale=self.scale,
                             block_kernel=self.block_kernel)

    def backward(self, source, q, k, v, out, dout, lse, dlse, backward):
        return hop_backward(backward, q, k, v, out, dout, lse, dlse, self.pattern, q_text=self.q_text,
                            q_range=self.q_span, k_range=self.spans[source], heads=self.heads)


def _training_ring_plan(state, kernels: BlockKernels, block_lengths, causal: bool, front_lengths=None,
                        sparse_hop=None) -> RingPlan:
    """The ring's plan for a call under autograd, after refusing kernels without a backward (the kernels are
    agreed for the group, so every rank refuses alike, before any transfer)."""
    check_backward(kernels.impl)
    check_backward(kernels.masked_kernel[1])
    new_exchange = functools.partial(RingExchange, state.ring_ranks, state.ring_rank, state.ring_group, state.timeout)
    return RingPlan(kernels, new_exchange, state.ring_rank, block_lengths, causal, front_lengths, sparse_hop)


def _replicated(x: torch.Tensor, prefix: int, seg: int) -> torch.Tensor:
    """The replicated rows of ``x [B, prefix + seg + suffix, ...]``: prefix rows, then suffix rows."""
    return torch.cat([x[:, :prefix], x[:, prefix + seg :]], dim=1)
