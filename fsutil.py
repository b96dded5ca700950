"""Durable file writes for the stores that live on disk (the token cache, the voices).

A write goes to a temp file that is fsynced and renamed over its target, so a reader or a crash
sees the whole old file or the whole new one. Temp files belong to a *writer*: an object that
holds an exclusive ``flock`` on ``<owner>.lock`` in the temp directory for its lifetime and names
its temp files ``<owner>.<tag>.<thread>.tmp``. A writer killed mid-write (``kill -9``, OOM) leaves
its temp file behind, and the kernel releases its lock: :meth:`WriterTemps.reap` takes the locks
it can (only dead writers') and removes their files at once, whatever their age. ``flock`` works
across processes and containers on one host, where pids alone would not (pid namespaces).

``Throttle`` keeps the caches' logs readable when their storage stays broken: one warning a
minute instead of one per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from pathlib import Path

TEMP_SUFFIX = ".tmp"
OWNER_LOCK_SUFFIX = ".lock"
PROBE_BYTES = 4096  # written by probe_writable: an empty file fits even on a full disk
WARN_EVERY_S = 60.0  # a disk or store that stays broken is logged once a minute, not per request


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_quietly(path: Path | str) -> None:
    """Remove ``path``; one that is already gone (another process removed it) is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, fsynced; on any failure nothing is left at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def probe_writable(directory: Path) -> str | None:
    """None when files can be created, written and synced in ``directory`` (made if missing), else
    why not (``strerror``: read-only file system, no space left, permission denied)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        write_durably(probe, b"\0" * PROBE_BYTES)
        unlink_quietly(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class Throttle:
    """Says yes at most once per ``every_s`` seconds (thread-safe): the caches log a storage failure
    that persists as a warning once a minute, and every other occurrence at debug level."""

    def __init__(self, every_s: float = WARN_EVERY_S) -> None:
        self.every_s = every_s
        self._last = -every_s  # the first call says yes
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """True (and the clock restarts) when ``every_s`` has passed since the last True or ``mark``."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.every_s:
                return False
            self._last = now
            return True

    def mark(self) -> None:
        """Count now as said: the next ``every_s`` seconds say no (a failure already reported elsewhere)."""
        with self._lock:
            self._last = time.monotonic()


class WriterTemps:
    """The temp files of one writer in ``directory``, and the removal of dead writers' ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._owner: tuple[int, str, int] | None = None  # (pid, owner name, fd of the held lock)
        self._lock = threading.Lock()

    def write(self, tag: str, data: bytes) -> Path:
        """A new durable temp file holding ``data``; ``tag`` (no dots) tells what it will become."""
        path = self.directory / f"{self._owner_name()}.{tag}.{threading.get_ident()}{TEMP_SUFFIX}"
        write_durably(path, data)
        return path

    def replace(self, tag: str, data: bytes, target: Path) -> None:
        """Write ``data`` over ``target`` atomically and durably (``target`` on the same file system)."""
        tmp = self.write(tag, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_dir(target.parent)

    def release(self) -> None:
        """Remove this writer's temp files and lock file, and give up the lock (a later write takes a new one)."""
        with self._lock:
            if self._owner is None:
                return
            pid, name, fd = self._owner
            self._owner = None
            if pid == os.getpid():
                for tmp in self.directory.glob(f"{name}.*{TEMP_SUFFIX}"):
                    unlink_quietly(tmp)
                unlink_quietly(self.directory / f"{name}{OWNER_LOCK_SUFFIX}")
            with contextlib.suppress(OSError):
                os.close(fd)

    def reap(self) -> int:
        """Remove the temp files of writers that died; returns how many files went.

        One small directory listing plus one non-blocking ``flock`` per live writer: cheap enough
        for every write. A temp file whose writer has no lock file left is a dead writer's too.
        """
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        mine = self._owner[1] if self._owner is not None and self._owner[0] == os.getpid() else None
        live = {mine}
        removed = 0
        for entry in entries:
            owner = entry.name.removesuffix(OWNER_LOCK_SUFFIX)
            if owner in (entry.name, mine):
                continue
            gone = self._reap_owner(owner)
            if gone is None:
                live.add(owner)
            else:
                removed += gone
        for entry in entries:
            owner = entry.name.split(".", 1)[0]
            orphan = entry.name.endswith(TEMP_SUFFIX) and owner not in live
            # written by an owner whose lock was already gone when we listed: dead as well
            if orphan and not (self.directory / f"{owner}{OWNER_LOCK_SUFFIX}").exists():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _reap_owner(self, owner: str) -> int | None:
        """Remove a dead writer's temp files and lock file (how many temp files went); None if it lives.

        The files go while we hold its lock, so a writer that just created that lock file and
        has not locked it yet sees it vanish and picks a new name (see ``_owner_name``).
        """
        lock_file = self.directory / f"{owner}{OWNER_LOCK_SUFFIX}"
        try:
            fd = os.open(lock_file, os.O_RDWR)
        except FileNotFoundError:  # another process reaped it just now
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            temps = list(self.directory.glob(f"{owner}.*{TEMP_SUFFIX}"))
            for tmp in temps:
                unlink_quietly(tmp)
            unlink_quietly(lock_file)
            return len(temps)
        finally:
            os.close(fd)

    def _owner_name(self) -> str:
        """This writer's name in this process, taking its lock on first use (and again after a fork)."""
        with self._lock:
            pid = os.getpid()
            if self._owner is not None and self._owner[0] == pid:
                return self._owner[1]
            if self._owner is not None:  # inherited through fork: the parent keeps its own lock
                with contextlib.suppress(OSError):
                    os.close(self._owner[2])
                self._owner = None
            self.directory.mkdir(parents=True, exist_ok=True)
            while True:
                name = f"{pid}-{secrets.token_hex(4)}"
                path = self.directory / f"{name}{OWNER_LOCK_SUFFIX}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:  # a reaper may take (and remove) the new file before our flock: then start again
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except (BlockingIOError, FileNotFoundError):
                    same = False
                if same:
                    self._owner = (pid, name, fd)
                    return name
                os.close(fd)
