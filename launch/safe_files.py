"""Writing an output file without following a symbolic link or replacing a file nobody said to replace.

The launch scripts check their output paths before any work, but the write comes minutes later and the
path may have changed meanwhile (a link planted there, a file appearing). So the data always goes into a
file this process creates itself with O_CREAT | O_EXCL | O_NOFOLLOW, which never opens an existing file
and never follows a link (not even a dangling one):

- ``replace=False``: that file is the path itself, so an existing file or link there fails the write
  (``FileExistsError``) and stays as it was.
- ``replace=True``: it is a new hidden file beside the path, renamed over it when complete
  (``os.replace`` swaps the directory entry: a link there is replaced, its target untouched; and a
  reader never sees half a file).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import BinaryIO, Iterator

__all__ = ["new_file"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create(path: str) -> int:
    return os.open(path, _FLAGS, 0o666)  # the mode any new file gets: the umask applies


@contextlib.contextmanager
def new_file(path: str | os.PathLike, *, replace: bool) -> Iterator[tuple[BinaryIO, str]]:
    """Yields ``(file, name)``: a new, empty file opened for writing and its name (for writers that take
    only a name; write through ``file`` where possible). On leaving, ``path`` holds what was written;
    on an exception nothing of it remains."""
    path = os.fspath(path)
    if replace:
        directory, base = os.path.split(os.path.abspath(path))
        stem, ext = os.path.splitext(base)  # ext kept last: some writers pick the format by it
        while True:
            name = os.path.join(directory, f".{stem}.tmp-{secrets.token_hex(4)}{ext}")
            try:
                fd = _create(name)
                break
            except FileExistsError:
                continue
    else:
        name, fd = path, _create(path)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file, name
        if replace:
            os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
