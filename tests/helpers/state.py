"""Reset usp_attn's process-wide selection state (forced/CLI backend, strictness, group
agreement, caches, logged-once messages) so tests cannot leak into each other."""

from __future__ import annotations

__all__ = ["reset_usp_attn_state"]


def reset_usp_attn_state() -> None:
    from usp_attn import backends, measured_choice, selector

    selector.global_force_attn_backend(None)
    selector.set_cli_attention_backend(None)
    selector.set_strict_backend(False)
    selector.set_group_agreement(None)
    selector.clear_selection_cache()
    backends.make_backend.cache_clear()  # kernel objects remember the module they imported
    measured_choice.set_kernel_choice()
    measured_choice.set_timer(measured_choice.CudaEventTimer())
    measured_choice.clear_measurements()
