"""Directories the server cannot write, for the storage tests: real where the machine allows it.

* ``refuse_writes``: the OS calls of this process answer ``EROFS`` (a read-only file system) or
  ``ENOSPC`` (a full one) for paths under one directory. It works everywhere; SQLite's own C
  calls are not covered (they see a writable disk).
* ``without_root_powers``: a command line that runs a program without ``CAP_DAC_OVERRIDE`` and
  ``CAP_DAC_READ_SEARCH``, so permission bits hold even for root (CI runs as root in a
  container, where ``chmod`` alone stops nothing). Not root: the command as it is.
* ``in_small_filesystem``: a command line that runs a program in its own user and mount
  namespaces, on a real 20 MB tmpfs mounted over a directory (``unshare -rm``; no privileges
  needed where user namespaces are allowed, which containers often forbid: then it is None).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Runs argv[1:] after dropping from the bounding set CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2)
# and CAP_FOWNER (3): for root, exec recomputes the permitted set from the bounding set.
_DROP_AND_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2, 3):\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:\n"  # PR_CAPBSET_DROP
    "        sys.exit('prctl(PR_CAPBSET_DROP): ' + os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path: object, root: Path) -> bool:
    if isinstance(path, int):
        return False
    text = os.path.realpath(os.fsdecode(path))  # type: ignore[arg-type]  # a symlink out of root leaves it
    return text == str(root) or text.startswith(str(root) + os.sep)


@contextlib.contextmanager
def refuse_writes(root: Path, code: int) -> Iterator[None]:
    """Inside the block, writing under ``root`` fails as on a read-only (``errno.EROFS``) or full
    (``errno.ENOSPC``) file system: read-only refuses every change; full refuses new data
    (writes, syncs, new directories) but lets files be removed and renamed, as a full disk does."""
    root = Path(os.path.realpath(root))
    real = {name: getattr(os, name) for name in ("open", "write", "fsync", "mkdir", "replace", "rename", "unlink")}
    doomed: set[int] = set()  # descriptors opened for writing under root (ENOSPC: their data is refused)

    def fail(path: object) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path) if not isinstance(path, int) else None)

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & _WRITE_FLAGS and _under(path, root) and code == errno.EROFS:
            raise fail(path)
        fd = real["open"](path, flags, *args, **kwargs)
        if flags & _WRITE_FLAGS and _under(path, root):
            doomed.add(fd)
        return fd

    def on_fd(name: str):  # write / fsync
        def call(fd: int, *args: object) -> object:
            if fd in doomed:
                raise OSError(code, os.strerror(code))
            return real[name](fd, *args)

        return call

    def on_path(name: str, *, full_too: bool):  # mkdir / replace / rename / unlink
        def call(path: object, *args: object, **kwargs: object) -> object:
            if _under(path, root) and (code == errno.EROFS or full_too):
                raise fail(path)
            return real[name](path, *args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", open_)
        mp.setattr(os, "write", on_fd("write"))
        mp.setattr(os, "fsync", on_fd("fsync"))
        mp.setattr(os, "mkdir", on_path("mkdir", full_too=True))
        for name in ("replace", "rename", "unlink"):
            mp.setattr(os, name, on_path(name, full_too=False))
        yield


def without_root_powers(argv: list[str]) -> list[str]:
    """``argv`` run so that permission bits bind it; skips the test where that cannot be arranged."""
    if os.geteuid() != 0:
        return argv
    inheritable = int(_status_field("CapInh"), 16)
    if inheritable & 0b1110:
        pytest.skip("this root process passes DAC capabilities on as inheritable: read-only bits would not hold")
    probe = subprocess.run([sys.executable, "-c", _DROP_AND_EXEC, "/bin/true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop root's file capabilities here: {probe.stderr.strip()}")
    return [sys.executable, "-c", _DROP_AND_EXEC, *argv]


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1]
    raise LookupError(name)


def make_read_only(root: Path) -> None:
    """Take write permission from ``root`` and everything under it (symlinks left alone)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def in_small_filesystem(
    mount_point: Path, argv: list[str], *, links: dict[str, Path] | None = None, size: str = "20m"
) -> list[str] | None:
    """``argv`` run with a fresh tmpfs of ``size`` over ``mount_point`` (seen by it alone: reach it
    through ``/proc/<pid>/root``) holding ``links`` (name -> target), or None where unprivileged
    user and mount namespaces are not allowed here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run(
        [unshare, "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m none "{mount_point}"'], capture_output=True
    )
    if probe.returncode != 0:
        return None
    setup = "".join(f' && ln -s "{target}" "$1/{name}"' for name, target in (links or {}).items())
    script = f'mount -t tmpfs -o size={size} none "$1"{setup} && shift && exec "$@"'
    return [unshare, "-rm", "sh", "-c", script, "sh", str(mount_point), *argv]
