"""Process settings: the one mutable object behind backend selection and the measured kernel choice.

Everything a process sets once and every layer reads (the forced and command-line backends,
strictness, the group's backend agreement, the kernel-choice mode and cache file, the
platform override of tests and diagnostics) lives in :data:`SETTINGS`, an instance of
:class:`Settings`. The public functions that change it (``global_force_attn_backend``,
``set_cli_attention_backend``, ``set_kernel_choice``, ...) stay where they are documented;
each bumps :attr:`Settings.version`, on which the layers key their selection caches.

Tests and tools take a :meth:`Settings.snapshot` and :meth:`Settings.restore` it, or call
:func:`reset` for a fresh process's settings and caches.
"""

from __future__ import annotations

import dataclasses

__all__ = ["SETTINGS", "Settings", "reset"]


@dataclasses.dataclass
class Settings:
    """What the selector and the measured choice read. Change it through the public setters.

    Attributes:
        forced: ``global_force_attn_backend``'s backend (beats ``cli``).
        cli: the ``--attention-backend`` value.
        strict: default of ``strict``: an explicit backend that cannot run raises.
        agreement: the SP group's :class:`~usp_attn.selector.GroupAgreement`, if any.
        agreement_local_platform: the platform this rank reported to the agreement.
        forced_at_agreement: the force this rank had when the agreement was made (its vote).
        kernel_choice: ``"measure"``, ``"static"`` or ``None`` (read the environment).
        kernel_cache: path of the measured-choice cache file, or ``None``.
        platform_override: the platform tests and diagnostics inject, or ``None``.
        version: bumped on every change; caches key on it.
        logged: messages :func:`~usp_attn.logs.log_once` has logged.
    """

    forced: object = None
    cli: object = None
    strict: bool = False
    agreement: object = None
    agreement_local_platform: object = None
    forced_at_agreement: object = None
    kernel_choice: str | None = None
    kernel_cache: str | None = None
    platform_override: object = None
    version: int = 0
    logged: set = dataclasses.field(default_factory=set)

    def changed(self) -> None:
        """Something that can change a selection changed: the layers re-select."""
        self.version += 1

    def snapshot(self) -> "Settings":
        """A copy to :meth:`restore` later."""
        return dataclasses.replace(self, logged=set(self.logged))

    def restore(self, snapshot: "Settings") -> None:
        """Put back a :meth:`snapshot` (the version still moves forward, so caches re-select)."""
        version = self.version
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(snapshot, field.name))
        self.logged = set(snapshot.logged)
        self.version = version + 1


#: The process's settings.
SETTINGS = Settings()


def reset() -> None:
    """A fresh process's settings, and every cache derived from them emptied (selections,
    measured kernel choices, kernel objects, logged-once messages)."""
    from usp_attn import backends, measured_choice, selector  # the caches live beside their users
    from usp_attn.backends import flash_bind

    SETTINGS.restore(Settings())
    selector.clear_selection_cache()
    backends.make_backend.cache_clear()  # kernel objects remember the module they imported
    flash_bind.clear()  # launches bound to an imported module's kernels
    measured_choice.reset()
