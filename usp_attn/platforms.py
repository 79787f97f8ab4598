"""What machine we are on: device kind, compute capability and installed kernel packages.

Detection runs once per process and never imports the optional packages (only
``importlib.util.find_spec``), so it is cheap and free of side effects. Tests and
the multi-rank agreement build :class:`Platform` objects by hand to exercise the
CUDA/ROCm/MPS rules on a CPU machine.
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

__all__ = [
    "PlatformKind",
    "Platform",
    "OPTIONAL_PACKAGES",
    "detect_platform",
    "current_platform",
    "override_platform",
    "platform_override_version",
]


class PlatformKind(str, enum.Enum):
    CUDA = "cuda"
    ROCM = "rocm"
    MPS = "mps"
    CPU = "cpu"

    def __str__(self) -> str:
        return self.value


# Import name -> distribution name, for the kernels the backends may use.
OPTIONAL_PACKAGES: dict[str, str] = {
    "flash_attn": "flash-attn",  # FA2 (CUDA) and the ROCm build
    "flash_attn_interface": "flash-attn-3",  # FA3, Hopper
    "flash_attn.cute": "flash-attn-cute",  # FA4, Blackwell (CuTe DSL)
    "sageattention": "sageattention",
    "sageattn3": "sageattn3",
    "aiter": "aiter",
}


@dataclasses.dataclass(frozen=True)
class Platform:
    """An immutable description of one rank's machine.

    Attributes:
        kind: CUDA, ROCm, MPS or CPU.
        device_name: e.g. ``"NVIDIA H100 80GB HBM3"``; informational.
        capability: ``(major, minor)`` compute capability on CUDA, ``None`` elsewhere.
        packages: optional kernel packages present, import name -> version
            (``""`` when the version is unknown).
        torch_version: ``torch.__version__`` of this process.
    """

    kind: PlatformKind
    device_name: str = ""
    capability: tuple[int, int] | None = None
    packages: tuple[tuple[str, str], ...] = ()
    torch_version: str = torch.__version__

    @classmethod
    def make(
        cls,
        kind: str | PlatformKind,
        *,
        capability: tuple[int, int] | None = None,
        packages: Mapping[str, str] | list[str] | tuple[str, ...] = (),
        device_name: str = "",
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
        )

    def has_package(self, name: str) -> bool:
        return any(p == name for p, _ in self.packages)

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


def _installed_packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for import_name, dist_name in OPTIONAL_PACKAGES.items():
        top, _, sub = import_name.partition(".")
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if sub:
            # Look for the subpackage on disk instead of importing the parent package.
            locations = list(spec.submodule_search_locations or [])
            if not any(os.path.isdir(os.path.join(loc, sub)) for loc in locations):
                continue
        try:
            found[import_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            found[import_name] = ""
    return found


def detect_platform() -> Platform:
    """Probe this process's machine. Cheap, but prefer :func:`current_platform` (cached)."""
    packages = _installed_packages()
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if getattr(torch.version, "hip", None):
            return Platform.make(PlatformKind.ROCM, packages=packages, device_name=name)
        cap = torch.cuda.get_device_capability(index)
        return Platform.make(PlatformKind.CUDA, capability=cap, packages=packages, device_name=name)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Platform.make(PlatformKind.MPS, packages=packages, device_name="Apple MPS")
    return Platform.make(PlatformKind.CPU, packages=packages, device_name="cpu")


_override: Platform | None = None
_override_version = 0


def platform_override_version() -> int:
    """Bumped whenever :func:`override_platform` enters or exits (selection caches key on it)."""
    return _override_version


_detected_platform: Platform | None = None


def _detected() -> Platform:
    # A plain global rather than lru_cache: torch.compile reads it as a constant.
    global _detected_platform
    if _detected_platform is None:
        _detected_platform = detect_platform()
    return _detected_platform


def current_platform() -> Platform:
    """The platform selection uses: an override if one is active, else the detected one."""
    return _override if _override is not None else _detected()


@contextlib.contextmanager
def override_platform(platform: Platform | None) -> Iterator[Platform | None]:
    """Pretend to run on ``platform`` inside the block (``None`` = use detection)."""
    global _override, _override_version
    previous = _override
    _override = platform
    _override_version += 1
    try:
        yield platform
    finally:
        _override = previous
        _override_version += 1
