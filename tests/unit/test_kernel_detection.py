"""Detection of the optional kernel packages by the function usp_attn calls, on real packages
written to disk: the flash-attn-4 wheel installs ``flash_attn/cute/`` without
``flash_attn/__init__.py``, so ``import flash_attn`` succeeds (a namespace package) but has no
``flash_attn_func``: that is FA4, not FA2."""

from __future__ import annotations

import sys

import pytest

from usp_attn import platforms
from usp_attn.backends.flash import FlashAttentionBackend, flash_generations

FA4_INIT = '''
from importlib.metadata import PackageNotFoundError, version
try:
    __version__ = version("fa4")
except PackageNotFoundError:
    __version__ = "0.0.0"

def flash_attn_func(q, k, v, qv=None, softmax_scale=None, causal=False, return_lse=False):
    raise RuntimeError("not a GPU")
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site directory first on sys.path; forgets modules imported from it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
    for name in ("flash_attn", "flash_attn.cute", "flash_attn_interface"):
        sys.modules.pop(name, None)


def write(site, relpath, text=""):
    path = site / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def dist_info(site, name, version):
    write(site, f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
          f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_flash_attn_4_alone_is_fa4_not_fa2(site):
    write(site, "flash_attn/cute/__init__.py", FA4_INIT)
    dist_info(site, "flash-attn-4", "4.0.0b36")
    usable, unusable = platforms._installed_packages(verify=True)
    assert usable.get("flash_attn.cute") == "4.0.0b36"
    assert "flash_attn" not in usable
    assert "namespace package without flash_attn_func" in unusable["flash_attn"]
    hopper = platforms.Platform.make("cuda", capability=(9, 0), packages=usable, unusable=unusable)
    assert flash_generations(hopper) == ("fa4",)
    assert FlashAttentionBackend.machine_reason(hopper) is None


def test_namespace_flash_attn_is_recognised_without_importing(site):
    """On a machine where no kernel can run, nothing is imported, yet the namespace is not FA2."""
    write(site, "flash_attn/cute/__init__.py", "raise ImportError('must not be imported here')\n")
    usable, unusable = platforms._installed_packages(verify=False)
    assert "flash_attn.cute" in usable and "flash_attn" in unusable
    assert "flash_attn.cute" not in sys.modules


def test_fa2_needs_its_function(site):
    write(site, "flash_attn/__init__.py", "__version__ = '2.8.3'\n")  # no flash_attn_func
    usable, unusable = platforms._installed_packages(verify=True)
    assert "flash_attn" not in usable and unusable["flash_attn"] == "flash_attn has no flash_attn_func"
    hopper = platforms.Platform.make("cuda", capability=(9, 0), packages=usable, unusable=unusable)
    reason = FlashAttentionBackend.machine_reason(hopper)
    assert "not installed" in reason and "flash_attn has no flash_attn_func" in reason


def test_a_package_that_fails_to_import_is_unusable_with_the_error(site):
    write(site, "flash_attn_interface.py", "raise OSError('libcudart.so.12: cannot open shared object file')\n")
    usable, unusable = platforms._installed_packages(verify=True)
    assert "flash_attn_interface" not in usable
    assert "importing flash_attn_interface failed: OSError: libcudart.so.12" in unusable["flash_attn_interface"]


def test_fa2_and_fa4_together(site):
    write(site, "flash_attn/__init__.py", "def flash_attn_func(*a, **k):\n    pass\n")
    write(site, "flash_attn/cute/__init__.py", FA4_INIT)
    dist_info(site, "flash-attn", "2.8.3")
    usable, unusable = platforms._installed_packages(verify=True)
    assert usable["flash_attn"] == "2.8.3" and "flash_attn.cute" in usable and not unusable
    assert flash_generations(platforms.Platform.make("cuda", capability=(9, 0), packages=usable)) == ("fa4", "fa2")
