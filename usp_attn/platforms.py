"""What machine we are on: device kind, compute capability and installed kernel packages.

A kernel package counts as installed only if the function usp_attn calls exists: the
``flash-attn-4`` wheel, for one, installs ``flash_attn/cute/`` without
``flash_attn/__init__.py``, which makes ``flash_attn`` an importable namespace package
with no ``flash_attn_func`` (it is not FA2). So detection, which runs once per process,
imports each package that is present on disk and looks the entry point up — on CUDA and
ROCm machines only; elsewhere no kernel package can run and none is imported. A package
that is present but unusable is recorded with the reason (``usp-attn info`` shows it).
Tests and the multi-rank agreement build :class:`Platform` objects by hand to exercise
the CUDA/ROCm/MPS rules on a CPU machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib.metadata
import importlib.util
import os
from typing import Iterator, Mapping

import torch

from usp_attn.settings import SETTINGS

__all__ = [
    "PlatformKind",
    "Platform",
    "OPTIONAL_PACKAGES",
    "detect_platform",
    "current_platform",
    "override_platform",
]


class PlatformKind(str, enum.Enum):
    CUDA = "cuda"
    ROCM = "rocm"
    MPS = "mps"
    CPU = "cpu"

    def __str__(self) -> str:
        return self.value


# Import name -> distribution name(s), for the kernels the backends may use. The first
# distribution found gives the version; FA3 and FA4 built from source use other names.
OPTIONAL_PACKAGES: dict[str, str] = {
    "flash_attn": "flash-attn",  # FA2 (CUDA) and the ROCm build
    "flash_attn_interface": "flash-attn-3",  # FA3, Hopper (built from flash-attention/hopper)
    "flash_attn.cute": "flash-attn-4",  # FA4 (CuTe DSL; PyPI wheel)
    "sageattention": "sageattention",
    "sageattn3": "sageattn3",
    "aiter": "aiter",
}
_OTHER_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "flash_attn_interface": ("flash_attn_3", "flashattn-hopper"),
    "flash_attn.cute": ("fa4", "flash-attn-cute"),
}

#: Import name -> the function a backend calls; the package counts only if it exists.
ENTRY_POINTS: dict[str, str] = {
    "flash_attn": "flash_attn_func",
    "flash_attn_interface": "flash_attn_func",
    "flash_attn.cute": "flash_attn_func",
    "sageattention": "sageattn",
    "sageattn3": "sageattn3_blackwell",
    "aiter": "flash_attn_func",
}


@dataclasses.dataclass(frozen=True)
class Platform:
    """An immutable description of one rank's machine.

    Attributes:
        kind: CUDA, ROCm, MPS or CPU.
        device_name: e.g. ``"NVIDIA H100 80GB HBM3"``; informational.
        capability: ``(major, minor)`` compute capability on CUDA, ``None`` elsewhere.
        packages: optional kernel packages present and usable, import name -> version
            (``""`` when the version is unknown).
        torch_version: ``torch.__version__`` of this process.
        unusable: ``(import name, reason)`` for packages present on disk whose entry
            point could not be loaded (e.g. a namespace-only ``flash_attn``).
    """

    kind: PlatformKind
    device_name: str = ""
    capability: tuple[int, int] | None = None
    packages: tuple[tuple[str, str], ...] = ()
    torch_version: str = torch.__version__
    unusable: tuple[tuple[str, str], ...] = ()

    @classmethod
    def make(
        cls,
        kind: str | PlatformKind,
        *,
        capability: tuple[int, int] | None = None,
        packages: Mapping[str, str] | list[str] | tuple[str, ...] = (),
        device_name: str = "",
        unusable: Mapping[str, str] = {},
    ) -> "Platform":
        """Build a platform by hand (tests, agreement). ``packages`` may be names or name->version."""
        if isinstance(packages, Mapping):
            items = tuple(sorted((str(k), str(v)) for k, v in packages.items()))
        else:
            items = tuple(sorted((str(p), "") for p in packages))
        return cls(
            kind=PlatformKind(kind),
            device_name=device_name or str(kind),
            capability=tuple(capability) if capability is not None else None,  # type: ignore[arg-type]
            packages=items,
            unusable=tuple(sorted((str(k), str(v)) for k, v in unusable.items())),
        )

    def has_package(self, name: str) -> bool:
        return any(p == name for p, _ in self.packages)

    def unusable_reason(self, name: str) -> str | None:
        """Why a package that is present cannot be used, if it is so."""
        return dict(self.unusable).get(name)

    def package_version(self, name: str) -> str | None:
        for p, v in self.packages:
            if p == name:
                return v
        return None

    @property
    def device_type(self) -> str:
        """The torch device type tensors live on (ROCm uses ``"cuda"``)."""
        return "cuda" if self.kind in (PlatformKind.CUDA, PlatformKind.ROCM) else self.kind.value

    def describe(self) -> str:
        cap = f" sm{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"{self.kind}{cap} ({self.device_name})"


def _present(import_name: str) -> str | None:
    """``"module"``, ``"namespace"`` (a directory without ``__init__.py``) or ``None``: what
    exists on disk under ``import_name``, found without importing it or its parent's code."""
    top, _, sub = import_name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not sub:
        return "module" if spec.origin not in (None, "namespace") else "namespace"
    found = any(os.path.isdir(os.path.join(loc, sub)) for loc in (spec.submodule_search_locations or []))
    return "module" if found else None


def _version(import_name: str) -> str:
    for dist in (OPTIONAL_PACKAGES[import_name], *_OTHER_DISTRIBUTIONS.get(import_name, ())):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _entry_point_problem(import_name: str) -> str | None:
    """Import the package and look up the function we call; ``None`` if it is there."""
    try:
        module = importlib.import_module(import_name)
    except Exception as exc:  # a broken extension raises anything (OSError, RuntimeError, ...)
        return f"importing {import_name} failed: {type(exc).__name__}: {exc}"
    entry = ENTRY_POINTS[import_name]
    if callable(getattr(module, entry, None)):
        return None
    if getattr(module, "__file__", None) is None:
        return _namespace_problem(import_name)
    return f"{import_name} has no {entry}"


def _namespace_problem(import_name: str) -> str:
    return (f"{import_name} is a namespace package without {ENTRY_POINTS[import_name]} (e.g. only "
            f"flash_attn.cute from flash-attn-4 is installed), not a usable {import_name}")


def _installed_packages(verify: bool) -> tuple[dict[str, str], dict[str, str]]:
    """``(usable: name -> version, unusable: name -> reason)``. ``verify``: import to check."""
    found: dict[str, str] = {}
    problems: dict[str, str] = {}
    for import_name in OPTIONAL_PACKAGES:
        kind = _present(import_name)
        if kind is None:
            continue
        if verify:
            problem = _entry_point_problem(import_name)
        else:  # no import where nothing can run; a namespace package is still recognisably not it
            problem = _namespace_problem(import_name) if kind == "namespace" else None
        if problem is None:
            found[import_name] = _version(import_name)
        else:
            problems[import_name] = problem
    return found, problems


def detect_platform() -> Platform:
    """Probe this process's machine (imports the kernel packages present on a GPU machine,
    once); prefer :func:`current_platform`, which caches it."""
    if torch.cuda.is_available():
        packages, unusable = _installed_packages(verify=True)
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if getattr(torch.version, "hip", None):
            return Platform.make(PlatformKind.ROCM, packages=packages, device_name=name, unusable=unusable)
        cap = torch.cuda.get_device_capability(index)
        return Platform.make(PlatformKind.CUDA, capability=cap, packages=packages, device_name=name,
                             unusable=unusable)
    packages, _ = _installed_packages(verify=False)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Platform.make(PlatformKind.MPS, packages=packages, device_name="Apple MPS")
    return Platform.make(PlatformKind.CPU, packages=packages, device_name="cpu")


_detected_platform: Platform | None = None


def _detected() -> Platform:
    # A plain global rather than lru_cache: torch.compile reads it as a constant.
    global _detected_platform
    if _detected_platform is None:
        _detected_platform = detect_platform()
    return _detected_platform


def current_platform() -> Platform:
    """The platform selection uses: an override if one is active, else the detected one."""
    override = SETTINGS.platform_override
    return override if override is not None else _detected()


@contextlib.contextmanager
def override_platform(platform: Platform | None) -> Iterator[Platform | None]:
    """Pretend to run on ``platform`` inside the block (``None`` = use detection)."""
    previous = SETTINGS.platform_override
    SETTINGS.platform_override = platform
    SETTINGS.changed()
    try:
        yield platform
    finally:
        SETTINGS.platform_override = previous
        SETTINGS.changed()
