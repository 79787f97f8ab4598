"""Sequence-parallel attention layers: ``USPAttention`` (Ulysses x ring) and its special cases.

Data flow for one call on SP rank ``r = ring_rank * U + ulysses_rank``, with local
shards ``q, k, v [B, n_pre + s_r + n_suf, H, D]`` (``n_pre``/``n_suf`` replicated tokens,
identical on every rank, e.g. text):

1. Ulysses (U > 1): one fused all-to-all turns the ``s_r`` sharded tokens of all heads
   into the whole group segment (``S_seg`` tokens) of head block ``ulysses_rank``. The
   replicated tokens skip the all-to-all: they are sliced to the same head block
   locally and written into rows reserved around the segment (no extra copy).
2. Ring (R > 1): the segment's queries (and the replicated queries) attend every ring
   rank's segment K/V, passed around the ring; the replicated K/V is attended once,
   locally. R == 1: one kernel call over [replicated + segment] keys.
3. Ulysses back: the inverse all-to-all returns ``[B, s_r, H, D]``; replicated-token
   outputs are all-gathered over heads (taking ring rank 0's copy, so every rank
   returns bit-identical replicated outputs).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum
from usp_attn.distributed.consistency import check_consistent
from usp_attn.distributed.ring_comm import RingExchange
from usp_attn.distributed.sharding import exchange_lengths
from usp_attn.distributed.state import SequenceParallelState, get_sequence_parallel_state
from usp_attn.distributed.ulysses_comm import gather_group_sequence, heads_to_sequence, sequence_to_heads
from usp_attn.layers.heads import HeadPlan
from usp_attn.layers.local import LocalAttention
from usp_attn.layers.ring import ring_attention
from usp_attn.layers.validation import check_qkv
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
        q, k, v: ``[B, n_pre + s_r + n_suf, H | H_kv, D]``, this rank's shard ``s_r`` of the
        sequence with the replicated tokens around it. Output: same shape as q; the
        replicated tokens' output is complete on every rank.
        attn_mask: optional bool key-padding mask ``[B, n_pre + s_r + n_suf]`` (True = attend),
        sharded like k. Other mask forms are accepted only with ``skip_sequence_parallel``
        or on a single rank.
        seq_len: global length of the sharded part (default: the length recorded by
        :func:`~usp_attn.shard_sequence`; if none was recorded, lengths are exchanged).
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
    ) -> torch.Tensor:
        state = self.state
        if self.skip_sequence_parallel or state is None or state.world_size == 1:
            if num_replicated_prefix or num_replicated_suffix:
                length = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() >= 2 else None
                _check_replicated(num_replicated_prefix, num_replicated_suffix, length, self.causal)
            return self.local(q, k, v, attn_mask)
        self._check_state(state)
        n_pre, n_suf = num_replicated_prefix, num_replicated_suffix
        error, local_len = None, None
        try:
            check_qkv(q, k, v, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                      head_size=self.head_size, causal=False)
            if k.shape[1] != q.shape[1]:
                raise ValueError(
                    f"q and k/v shards must have the same length under sequence parallelism, got {q.shape[1]} and "
                    f"{k.shape[1]}; for cross-attention with full k/v use skip_sequence_parallel=True"
                )
            _check_replicated(n_pre, n_suf, q.shape[1], self.causal)
            local_len = q.shape[1] - n_pre - n_suf
            _check_key_mask(attn_mask, q)
            if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
                raise ValueError(f"seq_len must be a non-negative int or None, got {seq_len!r}")
        except (ValueError, TypeError) as exc:
            if not state.validate:
                raise
            error = str(exc)
        total = seq_len if seq_len is not None else state.sequence_length
        if state.validate:
            summary = {
                "shape (B, H, D)": None if error else (q.shape[0], q.shape[2], q.shape[3]),
                "dtype": None if error else str(q.dtype),
                "num_replicated_prefix": n_pre,
                "num_replicated_suffix": n_suf,
                "attn_mask given": attn_mask is not None,
                "seq_len": total,
                "causal": self.causal,
            }
            check_consistent(state.sp_group, "USPAttention.forward", summary, error)
        sizes = state.sizes(total) if total is not None else exchange_lengths(local_len, state)
        if sizes[state.sp_rank] != local_len:
            raise ValueError(
                f"this rank's sequence shard has {local_len} tokens (q length {q.shape[1]} minus "
                f"{n_pre}+{n_suf} replicated), but a global length of {sum(sizes)} over {state.world_size} ranks "
                f"gives shards {list(sizes)}; pass seq_len= or shard with usp_attn.shard_sequence"
            )
        return self._forward_parallel(state, q, k, v, attn_mask, n_pre, n_suf, sizes)

    def _forward_parallel(self, state, q, k, v, attn_mask, n_pre, n_suf, sizes):
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        u_rank, r_rank = state.ulysses_rank, state.ring_rank
        s_r = sizes[state.sp_rank]
        img = slice(n_pre, n_pre + s_r)
        group_sizes = sizes[r_rank * u_deg : (r_rank + 1) * u_deg]
        seg = sum(group_sizes)
        plan = HeadPlan.make(self.num_heads, self.num_kv_heads, u_deg)
        key_mask = None if attn_mask is None else attn_mask.bool()

        # 1. Ulysses: sequence shard -> head shard of the whole segment (text rows reserved around it).
        if u_deg > 1:
            qp, kp, vp = plan.prepare_q(q), plan.prepare_kv(k), plan.prepare_kv(v)
            buf, ranges = sequence_to_heads(
                [qp[:, img], kp[:, img], vp[:, img]], group_sizes, state.ulysses_group,
                pad_front=n_pre, pad_back=n_suf,
            )
            for part, (a, b), is_kv in zip((qp, kp, vp), ranges, (False, True, True)):
                if n_pre:
                    buf[:n_pre, :, a:b].copy_(plan.local_block(part[:, :n_pre], u_rank, is_kv).transpose(0, 1))
                if n_suf:
                    buf[n_pre + seg :, :, a:b].copy_(plan.local_block(part[:, n_pre + s_r :], u_rank, is_kv).transpose(0, 1))
            q_all, k_all, v_all = (buf[:, :, a:b].transpose(0, 1) for a, b in ranges)
            if key_mask is not None:
                seg_mask = gather_group_sequence(key_mask[:, img].to(torch.uint8), group_sizes, state.ulysses_group)
                key_mask = torch.cat([key_mask[:, :n_pre], seg_mask.bool(), key_mask[:, n_pre + s_r :]], dim=1)
        else:
            q_all, k_all, v_all = q, k, v

        # 2. Attention over the whole sequence: one call (R == 1) or the ring (R > 1).
        kernel = self._kernel(state, q_all, k_all, v_all, key_mask is not None, n_pre, n_suf, seg, sizes)
        if r_deg == 1:
            mask4d = None if key_mask is None else key_mask[:, None, None, :]
            out_all = self.local.attend(q_all, k_all, v_all, mask=mask4d, causal=self.causal, kernel=kernel)
        else:
            out_all = self._ring(state, q_all, k_all, v_all, key_mask, n_pre, n_suf, seg, sizes, kernel)

        # 3. Back to sequence shards; replicated outputs gathered over heads.
        out_seg = out_all[:, n_pre : n_pre + seg]
        if u_deg > 1:
            out_img = heads_to_sequence(out_seg, group_sizes, u_rank, state.ulysses_group)[:, :, : self.num_heads]
        else:
            out_img = out_seg
        if not (n_pre or n_suf):
            return out_img
        text_out = torch.cat([out_all[:, :n_pre], out_all[:, n_pre + seg :]], dim=1)
        text_out = self._gather_replicated(state, text_out)
        return torch.cat([text_out[:, :n_pre], out_img, text_out[:, n_pre:]], dim=1)

    def _kernel(self, state, q_all, k_all, v_all, masked, n_pre, n_suf, seg, sizes):
        """The kernel for every block of this call, chosen once per shape class for the group.

        The class is built from the longest segment, which every SP rank knows identically,
        so all ranks look up (and on a miss, measure on rank 0) the same class together.
        """
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        longest = max(sum(sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        if r_deg == 1:
            keys = slice(None)
            lengths = (n_pre + longest + n_suf,) * 2
        else:  # ring blocks: this segment's queries against one segment's keys at a time
            keys = slice(n_pre, n_pre + seg)
            lengths = (n_pre + longest + n_suf, longest)
        return self.local.kernel_for(q_all, k_all[:, keys], v_all[:, keys], causal=self.causal, need_mask=masked,
                                     need_lse=r_deg > 1, lengths=lengths, group=state.sp_group)

    def _ring(self, state, q_all, k_all, v_all, key_mask, n_pre, n_suf, seg, sizes, kernel):
        u_deg, r_deg = state.ulysses_degree, state.ring_degree
        block_lengths = tuple(sum(sizes[r * u_deg : (r + 1) * u_deg]) for r in range(r_deg))
        own = slice(n_pre, n_pre + seg)
        local_blocks = ()
        if n_pre or n_suf:  # replicated K/V: attended once, here, never passed around the ring
            text_k = torch.cat([k_all[:, :n_pre], k_all[:, n_pre + seg :]], dim=1)
            text_v = torch.cat([v_all[:, :n_pre], v_all[:, n_pre + seg :]], dim=1)
            text_mask = None
            if key_mask is not None:
                text_mask = torch.cat([key_mask[:, :n_pre], key_mask[:, n_pre + seg :]], dim=1)
            local_blocks = ((text_k, text_v, text_mask),)
        exchange = RingExchange(state.ring_ranks, state.ring_rank, state.ring_group, state.timeout)
        return ring_attention(
            functools.partial(self.local.attend, kernel=kernel), q_all, k_all[:, own], v_all[:, own],
            exchange=exchange, ring_rank=state.ring_rank, block_lengths=block_lengths,
            causal=self.causal, key_mask=None if key_mask is None else key_mask[:, own],
            local_blocks=local_blocks,
        )

    def _gather_replicated(self, state, text_out):
        """``[B, n_text, h_local, D]`` -> ``[B, n_text, H, D]``, identical on every rank.

        Each ring rank merged the blocks in a different order, so their (equal up to
        rounding) copies differ in the last bits; everyone takes ring rank 0's.
        """
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


def _check_replicated(n_pre, n_suf, length, causal) -> None:
    for name, n in (("num_replicated_prefix", n_pre), ("num_replicated_suffix", n_suf)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if length is not None and n_pre + n_suf > length:
        raise ValueError(
            f"num_replicated_prefix + num_replicated_suffix = {n_pre + n_suf} exceeds the local sequence "
            f"length {length}"
        )
    if causal and (n_pre or n_suf):
        raise ValueError("causal=True cannot be combined with replicated (prefix/suffix) tokens")


def _check_key_mask(attn_mask, q) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (q.shape[0], q.shape[1]):
        raise ValueError(
            f"under sequence parallelism attn_mask must be a bool key-padding mask [B, S_local] = "
            f"[{q.shape[0]}, {q.shape[1]}] (True = attend), got {attn_mask.dtype} {list(attn_mask.shape)}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
