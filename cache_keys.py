"""Content keys and fingerprints: what names a cache record and what makes it stale.

A record is keyed by the prompt audio's content (never a file name), so the same voice hits
whatever it was uploaded as; the fingerprint of the model files and settings that shaped the
record is stored beside it, so new weights miss instead of reusing old features. Both levels of
the cache (this host's files, a shared store) use the same keys and fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # bump when the payload layout or the meaning of stored arrays changes (2: one record)

# fingerprint_of: files up to FULL_HASH_LIMIT are hashed entirely (codebook, configs, small
# ONNX); bigger ones (multi-GB weights) by identity + their first and last EDGE_BYTES, so a
# server start does not read gigabytes. size + mtime_ns catch an in-place replacement whose
# edges happen to be equal.
FULL_HASH_LIMIT = 64 * 1024**2  # 64 MiB
EDGE_BYTES = 4 * 1024**2  # 4 MiB
_READ_CHUNK = 1024**2


def content_key(wav: Any, sample_rate: int) -> str:
    """sha256 hex of the prepared samples (as little-endian float32) and their sample rate.

    ``wav`` is a numpy array or torch tensor; leading/trailing singleton axes are ignored, so a
    ``(1, n)`` prompt and its ``(n,)`` view share a key, while the shape after squeezing is
    hashed so that ``(2, n)`` and ``(1, 2n)`` do not collide.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if hasattr(wav, "detach"):  # torch.Tensor, without importing torch here
        wav = wav.detach().cpu().float().numpy()
    samples = np.ascontiguousarray(np.squeeze(np.asarray(wav)), dtype="<f4")
    h = hashlib.sha256()
    h.update(b"step-audio-content-key-v1\0")
    h.update(json.dumps([int(sample_rate), list(samples.shape)]).encode())
    h.update(samples.tobytes())
    return h.hexdigest()


_file_digest_memo: dict[tuple[str, int, int, int, int], str] = {}
_memo_lock = threading.Lock()


def _file_digest(path: Path) -> str:
    """Content digest of one file (see FULL_HASH_LIMIT / EDGE_BYTES), memoised per identity."""
    st = path.stat()
    ident = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if ident in _file_digest_memo:
            return _file_digest_memo[ident]
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_LIMIT:
            h.update(b"full\0")
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
        else:
            h.update(f"edges\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            h.update(f.read(EDGE_BYTES))
            f.seek(st.st_size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    digest = h.hexdigest()
    with _memo_lock:
        _file_digest_memo[ident] = digest
    return digest


def fingerprint_of(paths: Iterable[Path | str], **settings: Any) -> str:
    """Stable hash of the files (or directories, recursively) and settings that shape the tokens.

    Files are identified by their name relative to the given path (not the absolute location,
    so moving a bundle keeps its cache) and their content digest: full sha256 below 64 MiB,
    size + mtime_ns + first/last 4 MiB above. ``settings`` must be JSON-able (others are
    ``str()``-ed); :data:`FORMAT_VERSION` is always included.
    """
    h = hashlib.sha256()
    h.update(f"step-audio-cache-fingerprint\0format={FORMAT_VERSION}\0".encode())
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            h.update(f"dir\0{p.name}\0{len(files)}\0".encode())
            for q in files:
                h.update(f"{q.relative_to(p).as_posix()}\0{_file_digest(q)}\0".encode())
        elif p.is_file():
            h.update(f"file\0{p.name}\0{_file_digest(p)}\0".encode())
        else:
            raise FileNotFoundError(f"fingerprint_of: {p} does not exist")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
