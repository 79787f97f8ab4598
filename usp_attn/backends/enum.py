"""The backend names users see: the enum, its CLI spellings and the parser."""

from __future__ import annotations

import enum

__all__ = ["AttentionBackendEnum", "parse_attention_backend", "BACKEND_ALIASES"]


class AttentionBackendEnum(enum.Enum):
    """Local attention kernels usp_attn can run.

    ``str(member)`` is the lowercase CLI name accepted by ``--attention-backend``.
    """

    FA = "fa"
    TORCH_SDPA = "torch_sdpa"
    SAGE_ATTN = "sage_attn"
    SAGE_ATTN_3 = "sage_attn_3"
    AITER = "aiter"

    def __str__(self) -> str:
        return self.value


# fa3/fa4 name FlashAttention generations; the runtime picks the generation the
# machine has, so the user-facing choice is just "fa".
BACKEND_ALIASES: dict[str, AttentionBackendEnum] = {
    "fa3": AttentionBackendEnum.FA,
    "fa4": AttentionBackendEnum.FA,
}

_AUTO_NAMES = ("", "auto")


def valid_backend_names() -> list[str]:
    return [m.value for m in AttentionBackendEnum] + list(BACKEND_ALIASES) + ["auto"]


def parse_attention_backend(name: str | AttentionBackendEnum | None) -> AttentionBackendEnum | None:
    """Turn a user-supplied backend name into an enum member.

    Case-insensitive, surrounding whitespace ignored. ``fa3``/``fa4`` map to ``FA``.
    ``None``, ``""`` and ``"auto"`` mean automatic selection and return ``None``.

    Raises:
        ValueError: the name is not a backend; the message lists the valid names.
        TypeError: ``name`` is neither a string, an enum member nor ``None``.
    """
    if name is None or isinstance(name, AttentionBackendEnum):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"attention backend must be a str, AttentionBackendEnum or None, got {type(name).__name__}"
        )
    key = name.strip().lower()
    if key in _AUTO_NAMES:
        return None
    if key in BACKEND_ALIASES:
        return BACKEND_ALIASES[key]
    for member in AttentionBackendEnum:
        if member.value == key:
            return member
    raise ValueError(
        f"unknown attention backend {name!r}; valid names: {', '.join(valid_backend_names())}"
    )
