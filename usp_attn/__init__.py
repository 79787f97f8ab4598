"""usp_attn: sequence-parallel attention (Ulysses, ring, USP) for video DiT inference.

Importing this package has no side effects: no torch flags change, nothing is
patched, no optional kernel package is imported.
"""

from usp_attn.backends import AttentionBackendEnum, parse_attention_backend
from usp_attn.config import AttentionConfig, add_attention_args
from usp_attn.distributed.agreement import agree_on_backend
from usp_attn.distributed.sharding import gather_sequence, shard_sequence
from usp_attn.distributed.state import (
    SequenceParallelState,
    destroy_sequence_parallel,
    get_sequence_parallel_state,
    init_sequence_parallel,
)
from usp_attn.layers.local import LocalAttention
from usp_attn.layers.usp import RingAttention, UlyssesAttention, USPAttention
from usp_attn.measured_choice import set_kernel_choice
from usp_attn.platforms import Platform, PlatformKind, current_platform, detect_platform, override_platform
from usp_attn.selector import (
    AttentionBackendUnavailableError,
    BackendSelection,
    GroupAgreement,
    get_attn_backend,
    global_force_attn_backend,
    global_force_attn_backend_context_manager,
    set_cli_attention_backend,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionBackendEnum",
    "AttentionBackendUnavailableError",
    "AttentionConfig",
    "BackendSelection",
    "GroupAgreement",
    "LocalAttention",
    "RingAttention",
    "SequenceParallelState",
    "UlyssesAttention",
    "USPAttention",
    "destroy_sequence_parallel",
    "gather_sequence",
    "get_sequence_parallel_state",
    "init_sequence_parallel",
    "shard_sequence",
    "Platform",
    "PlatformKind",
    "add_attention_args",
    "agree_on_backend",
    "current_platform",
    "detect_platform",
    "get_attn_backend",
    "global_force_attn_backend",
    "global_force_attn_backend_context_manager",
    "override_platform",
    "parse_attention_backend",
    "set_cli_attention_backend",
    "set_kernel_choice",
]
