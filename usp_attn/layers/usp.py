"""Sequence-parallel attention layers: ``USPAttention`` (Ulysses x ring) and its special cases.

Data flow for one call on SP rank ``r = ring_rank * U + ulysses_rank``, with local
shards ``q [B, n_pre + s_r + n_suf, H, D]`` and ``k, v [B, kv_pre + n_pre + s_r + n_suf +
kv_suf, H_kv, D]`` (``n_pre``/``n_suf`` replicated tokens, identical on every rank, e.g. text;
``kv_pre``/``kv_suf`` replicated keys/values without queries; see ``sp_arguments``):

1. Ulysses (U > 1): one fused all-to-all turns the ``s_r`` sharded tokens of all heads
   into the whole group segment (``S_seg`` tokens) of head block ``ulysses_rank``. The
   replicated tokens skip the all-to-all: they are sliced to the same head block
   locally and written into rows reserved around the segment (no extra copy)
   (``ulysses_steps``; causal on the zigzag layout also reorders the segment).
2. Ring (R > 1): the segment's queries (and the replicated queries) attend every ring
   rank's segment K/V, passed around the ring; the replicated K/V is attended once,
   locally. R == 1: one kernel call over [replicated + segment] keys. Causal: the
   per-hop calls of ``ring_blocks`` (contiguous or zigzag layout).
3. Ulysses back: the inverse all-to-all returns ``[B, s_r, H, D]``; replicated-token
   outputs are all-gathered over heads (taking ring rank 0's copy, so every rank
   returns bit-identical replicated outputs). With ``return_lse`` the log-sum-exp
   ``[B, H, rows]`` takes the same way back (its own, D times smaller all-to-all).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum
from usp_attn.distributed.collectives_grad import gather_replicated_with_grad, grad_required, share_replicated_grads
from usp_attn.distributed.consistency import call_signature, check_call, check_reason, shared_summary
from usp_attn.distributed.failures import name_failed_ranks
from usp_attn.distributed.ring_comm import RingExchange
from usp_attn.distributed.sharding import exchange_lengths
from usp_attn.distributed.state import SequenceParallelState, get_sequence_parallel_state
from usp_attn.distributed.zigzag import rank_chunks, ring_front_lengths
from usp_attn.layers.attention_grad import BlockKernels, check_backward
from usp_attn.layers.heads import HeadPlan
from usp_attn.layers.local import LocalAttention
from usp_attn.layers.ring import key_mask_4d, ring_attention
from usp_attn.layers.replicated_keys import attend_with_masked_replicated_keys
from usp_attn.layers.ring_grad import RingPlan, ring_attention_with_grad
from usp_attn.layers.sp_arguments import ReplicatedRows, check_key_mask, check_load_balance, check_replicated_key_mask
from usp_attn.layers.ulysses_steps import UlyssesSteps
from usp_attn.layers.validation import check_group_device, check_qkv, check_return_lse
from usp_attn.selector import AttentionBackendUnavailableError

__all__ = ["USPAttention", "UlyssesAttention", "RingAttention"]


class USPAttention(nn.Module):
    """Attention over a sequence sharded across the sequence-parallel group (Ulysses x ring).

    Args:
        num_heads, head_size, num_kv_heads, softmax_scale, causal,
        supported_attention_backends: as :class:`~usp_attn.LocalAttention`.
        skip_sequence_parallel: cross-attention mode: q is the local shard, k/v are
            full on every rank; no communication at all.
        state: the :class:`SequenceParallelState` to use (default: the global one at
            call time; none initialised = a single rank, i.e. ``LocalAttention``).

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
    ) -> None:
        super().__init__()
        self.local = LocalAttention(
            num_heads, head_size, num_kv_heads, softmax_scale, causal, supported_attention_backends
        )
        self.num_heads, self.head_size = self.local.num_heads, self.local.head_size
        self.num_kv_heads, self.causal = self.local.num_kv_heads, self.local.causal
        self.skip_sequence_parallel = bool(skip_sequence_parallel)
        self._state = state
        self._checked_layouts: set = set()
        if state is not None:
            self._check_state(state)

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
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        rows = ReplicatedRows(num_replicated_prefix, num_replicated_suffix, num_replicated_kv_prefix,
                              num_replicated_kv_suffix)
        if self.skip_sequence_parallel or state is None or state.world_size == 1:
            check_return_lse(return_lse)
            check_load_balance(load_balance)
            shaped = all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (q, k))
            if rows.any and shaped:  # cross-attention's k/v are complete: any row count of theirs is right
                rows.check_rows(q.shape[1], None if self.skip_sequence_parallel else k.shape[1], self.causal)
            elif rows.any:
                rows.check_counts(self.causal)
            if replicated_key_mask is not None and shaped:  # one call: the mask over every key
                text = check_replicated_key_mask(replicated_key_mask, q, rows, attn_mask, grad_required(q, k, v))
                attn_mask = _full_key_mask(text, rows, k.shape[1])
            return self.local(q, k, v, attn_mask, return_lse=return_lse)
        self._check_state(state)
        layout_arg = state.load_balance if load_balance is None else load_balance
        balanced = layout_arg is True
        total = seq_len if seq_len is not None else state.sequence_length
        # Host-only; in steady state (signature as last agreed) no check and no communication.
        signature = call_signature(q, k, v, attn_mask, rows.prefix, rows.suffix, total, return_lse=return_lse,
                                   num_replicated_kv_prefix=rows.kv_prefix, num_replicated_kv_suffix=rows.kv_suffix,
                                   load_balance=layout_arg, replicated_key_mask=replicated_key_mask is not None)
        reason = check_reason(self, state, signature)
        error, local_len, sizes, key_mask, text_mask = None, None, None, None, None
        layout = "zigzag (load_balance=True)" if balanced else "contiguous"
        try:
            check_qkv(q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      head_size=self.head_size, causal=False)
            check_group_device(q, state.sp_group)
            check_return_lse(return_lse)
            check_load_balance(load_balance)
            local_len = rows.check_rows(q.shape[1], k.shape[1], self.causal)
            key_mask = check_key_mask(attn_mask, q, k, grad_required(q, k, v))
            text_mask = check_replicated_key_mask(replicated_key_mask, q, rows, attn_mask, grad_required(q, k, v))
            if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
                raise ValueError(f"seq_len must be a non-negative int or None, got {seq_len!r}")
            if total is not None:
                sizes = state.sizes(total, balanced)
                if sizes[state.sp_rank] != local_len:
                    raise ValueError(
                        f"the local sequence shard has {local_len} tokens (q length {q.shape[1]} minus "
                        f"{rows.prefix}+{rows.suffix} replicated), but seq_len={total} over {state.world_size} ranks "
                        f"in the {layout} layout gives shards {list(sizes)}; pass the global seq_len= (and "
                        "load_balance=) or shard with usp_attn.shard_sequence"
                    )
        except (ValueError, TypeError) as exc:
            if reason is None:
                raise
            error = str(exc)
        if reason is not None:  # every rank raises the same error here, or none does
            lengths = check_call(self, state, signature, reason, error, local_len, "USPAttention.forward")
            if sizes is None and lengths is not None:
                sizes = tuple(lengths)
        if sizes is None:
            sizes = exchange_lengths(local_len, state)
        if balanced and tuple(sizes) != state.sizes(sum(sizes), True):  # the same tuple everywhere: same verdict
            raise ValueError(
                f"load_balance=True, but the ranks' shard lengths {list(sizes)} are not the zigzag layout of "
                f"{sum(sizes)} tokens ({list(state.sizes(sum(sizes), True))}); shard with "
                "usp_attn.shard_sequence(x, load_balance=True)"
            )
        try:
            return self._forward_parallel(state, q, k, v, key_mask, rows, tuple(sizes), balanced, return_lse,
                                          text_mask)
        except RuntimeError as exc:  # a failed collective names the rank behind it
            named = name_failed_ranks(state, exc, "USPAttention.forward", lambda: shared_summary(self, signature))
            if named is None:
                raise
            raise named from exc

    def _forward_parallel(self, state, q, k, v, key_mask, rows, sizes, balanced, return_lse, text_mask=None):
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        r_rank, world, total = state.ring_rank, state.world_size, sum(sizes)
        n_pre, n_suf = rows.prefix, rows.suffix  # q's replicated rows (k's: rows.key_prefix/suffix)
        group_sizes = sizes[r_rank * u_deg : (r_rank + 1) * u_deg]
        seg = sum(group_sizes)
        # Causal on the zigzag layout: the segment in global order [F_g | B_g] (see distributed/zigzag).
        zigzag = balanced and self.causal
        grad = grad_required(q, k, v)
        if grad:  # training: every step below is recorded with its adjoint (collectives_grad)
            need_lse = r_deg > 1 or return_lse
            check_backward(self.local.selection(q.dtype, need_mask=key_mask is not None, need_lse=need_lse).impl)
            if rows.any:
                k_pre, k_suf = rows.key_prefix, rows.key_suffix
                q, k, v = share_replicated_grads((q, k, v), (n_pre, k_pre, k_pre), (n_suf, k_suf, k_suf),
                                                 world=world, group=state.sp_group)

        # 1. Ulysses: sequence shard -> head shard of the whole segment (replicated rows reserved around it).
        ulysses = None
        if u_deg > 1:
            pieces = [rank_chunks(total, world, r_rank * u_deg + u) for u in range(u_deg)] if zigzag else None
            ulysses = UlyssesSteps(HeadPlan.make(self.num_heads, self.num_kv_heads, u_deg), group_sizes,
                                   state.ulysses_rank, state.ulysses_group, rows, pieces, grad)
            q_all, k_all, v_all, key_mask = ulysses.to_heads(q, k, v, key_mask)
        else:
            q_all, k_all, v_all = q, k, v  # U == 1: the rank's rows [c_r | c_2W-1-r] are in global order

        # 2. Attention over the whole sequence: one call (R == 1) or the ring (R > 1). A mask on the
        # replicated keys only: the sharded keys unmasked on the fast kernel, the replicated ones
        # masked on a kernel that takes masks (masked calls are never measured: no collective).
        split = text_mask is not None
        kernel = self._kernel(state, q_all, k_all, v_all, key_mask is not None, rows, sizes, return_lse, split)
        kernels = BlockKernels(self.local, kernel)
        if split:
            text_k, text_v = (_replicated(t, rows.key_prefix, seg) for t in (k_all, v_all))
            kernels.masked_kernel = self.local.kernel_for(q_all, text_k, text_v, need_mask=True, need_lse=True)
        if r_deg == 1 and split:
            own = slice(rows.key_prefix, rows.key_prefix + seg)
            result = attend_with_masked_replicated_keys(kernels, q_all, k_all[:, own], v_all[:, own], text_k, text_v,
                                                        text_mask, return_lse=return_lse)
        elif r_deg == 1:
            result = self.local.attend(q_all, k_all, v_all, mask=key_mask_4d(key_mask), causal=self.causal,
                                       kernel=kernel, return_lse=return_lse)
        else:
            fronts = ring_front_lengths(total, u_deg, r_deg) if zigzag else None
            result = self._ring(state, q_all, k_all, v_all, key_mask, rows, seg, sizes, kernels, fronts, return_lse,
                                text_mask)
        out_all, lse_all = result if return_lse else (result, None)

        # 3. Back to sequence shards; replicated outputs gathered over heads. The LSE goes the same way.
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
        return (out, lse) if return_lse else out

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

    def _ring(self, state, q_all, k_all, v_all, key_mask, rows, seg, sizes, kernels, fronts, return_lse,
              text_mask=None):
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        block_lengths = tuple(sum(sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        k_pre = rows.key_prefix
        own = slice(k_pre, k_pre + seg)
        text_k = text_v = None
        if rows.key_prefix or rows.key_suffix:  # replicated K/V: attended once, here, never passed around the ring
            text_k, text_v = _replicated(k_all, k_pre, seg), _replicated(v_all, k_pre, seg)
            if key_mask is not None:
                text_mask = _replicated(key_mask, k_pre, seg)
        own_mask = None if key_mask is None else key_mask[:, own]
        if grad_required(q_all, k_all, v_all):
            check_backward(kernels.impl)  # the kernels agreed for the group: the same on every rank
            check_backward(kernels.masked_kernel[1])
            new_exchange = functools.partial(RingExchange, state.ring_ranks, state.ring_rank, state.ring_group,
                                             state.timeout)
            ring = RingPlan(kernels, new_exchange, state.ring_rank, block_lengths, self.causal, fronts)
            return ring_attention_with_grad(ring, q_all, k_all[:, own], v_all[:, own], key_mask=own_mask,
                                            text_k=text_k, text_v=text_v, text_mask=text_mask, return_lse=return_lse)
        exchange = RingExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout)
        local_blocks = () if text_k is None else ((text_k, text_v, text_mask),)
        return ring_attention(
            kernels.attend, q_all, k_all[:, own], v_all[:, own],
            exchange=exchange, ring_rank=state.ring_rank, block_lengths=block_lengths, causal=self.causal,
            key_mask=own_mask, local_blocks=local_blocks, return_lse=return_lse, front_lengths=fronts,
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


def _replicated(x: torch.Tensor, prefix: int, seg: int) -> torch.Tensor:
    """The replicated rows of ``x [B, prefix + seg + suffix, ...]``: prefix rows, then suffix rows."""
    return torch.cat([x[:, :prefix], x[:, prefix + seg :]], dim=1)


def _full_key_mask(text_mask: torch.Tensor, rows: ReplicatedRows, num_keys: int) -> torch.Tensor:
    """``[B, n]`` over the replicated keys -> ``[B, num_keys]`` over all keys, the others attended."""
    keep = torch.ones if text_mask.dtype == torch.bool else torch.zeros  # bool True / additive 0: attend
    middle = keep((), dtype=text_mask.dtype, device=text_mask.device)
    middle = middle.expand(len(text_mask), num_keys - text_mask.shape[1])
    return torch.cat([text_mask[:, : rows.key_prefix], middle, text_mask[:, rows.key_prefix :]], dim=1)
