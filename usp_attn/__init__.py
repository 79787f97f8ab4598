"""usp_attn: sequence-parallel attention (Ulysses, ring, USP) for video DiT inference.

The front door: the layers, the sequence-parallel set-up, sharding helpers, backend names and
the two ways to force one, the configuration helpers, the errors, and the sparse patterns
(``usp_attn.sparse`` has the rest of sparse attention). Selection and platform
plumbing live one level down (``usp_attn.selector``, ``usp_attn.platforms``,
``usp_attn.measured_choice``, ``usp_attn.backends``, ``usp_attn.settings``).

Importing this package has no side effects: no torch flags change, nothing is patched, no
optional kernel package is imported.
"""

from usp_attn.arguments import ReplicatedRows
from usp_attn.backends import AttentionBackendEnum
from usp_attn.config import AttentionConfig, add_attention_args
from usp_attn.distributed.guard import CollectiveError
from usp_attn.distributed.cfg import cfg_gather, cfg_split
from usp_attn.distributed.sharding import gather_sequence, shard_sequence
from usp_attn.distributed.state import (
    SequenceParallelState,
    destroy_sequence_parallel,
    get_sequence_parallel_state,
    init_sequence_parallel,
)
from usp_attn.layers.local import LocalAttention
from usp_attn.layers.usp import RingAttention, UlyssesAttention, USPAttention
from usp_attn.selector import (
    AttentionBackendUnavailableError,
    global_force_attn_backend,
    global_force_attn_backend_context_manager,
)
from usp_attn.sparse import SlidingTileSparsity, TopMassSparsity, VideoGrid, sparsity_error

__version__ = "0.2.0"

__all__ = [
    "AttentionBackendEnum",
    "AttentionBackendUnavailableError",
    "AttentionConfig",
    "CollectiveError",
    "LocalAttention",
    "ReplicatedRows",
    "RingAttention",
    "SequenceParallelState",
    "SlidingTileSparsity",
    "TopMassSparsity",
    "UlyssesAttention",
    "USPAttention",
    "VideoGrid",
    "add_attention_args",
    "cfg_gather",
    "cfg_split",
    "destroy_sequence_parallel",
    "gather_sequence",
    "get_sequence_parallel_state",
    "global_force_attn_backend",
    "global_force_attn_backend_context_manager",
    "init_sequence_parallel",
    "shard_sequence",
    "sparsity_error",
]
