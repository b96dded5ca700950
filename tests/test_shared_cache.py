"""The prompt cache's two levels on a real S3-compatible server (moto): two hosts' local caches
(two directories) in front of one shared level, as two replicas have."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from object_store import S3Store, open_store
from shared_cache import TwoLevelCache, with_shared_level
from tests.s3_server import MotoS3
from token_cache import TokenCache, count_lookups

FP = "f" * 64
KEY = "a1" * 32


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "vq02": rng.integers(0, 1024, 40).astype(np.int64),
        "prompt_mel": rng.standard_normal((1, 30, 80)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture
def replicas(moto: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TwoLevelCache, TwoLevelCache]:
    """Two replicas' caches: each its own directory, one shared store (a fresh prefix per test)."""
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    url = moto.url(f"cache-{time.monotonic_ns()}")
    caches = []
    for host in ("a", "b"):
        cache = with_shared_level(TokenCache(tmp_path / host, 10**7, FP), open_store(url, tmp_path), FP)
        assert isinstance(cache, TwoLevelCache)
        caches.append(cache)
    return caches[0], caches[1]


def test_a_record_computed_on_one_replica_is_a_hit_on_the_other(replicas: tuple[TwoLevelCache, TwoLevelCache]) -> None:
    a, b = replicas
    a.put(KEY, _arrays(), compute_seconds=2.5)
    with count_lookups() as tally:
        got = b.get(KEY, names=("vq02", "prompt_mel"))
    assert got is not None and np.array_equal(got["prompt_mel"], _arrays()["prompt_mel"])
    assert (tally.hits, tally.misses) == (1, 0)  # the request counts one hit, not a local miss too
    stats = b.stats().as_dict()
    assert stats["hits"] == 1 and stats["misses"] == 0 and stats["time_saved_s"] == 2.5
    assert stats["shared"]["hits"] == 1  # type: ignore[index]
    # the hit was copied into b's own level: it answers now without the store
    assert b.local is not None and b.local.get(KEY) is not None


def test_a_damaged_shared_record_is_dropped_and_recomputed_never_served(
    replicas: tuple[TwoLevelCache, TwoLevelCache], moto: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas
    a.put(KEY, _arrays())
    assert isinstance(b.store, S3Store)
    raw, name = moto.client(), f"{b.store.prefix}{KEY}.npz"
    head = raw.head_object(Bucket=moto.bucket, Key=name)
    body = bytearray(raw.get_object(Bucket=moto.bucket, Key=name)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # one flipped bit, the old checksum kept
    raw.put_object(Bucket=moto.bucket, Key=name, Body=bytes(body), Metadata=head["Metadata"])
    with caplog.at_level(logging.WARNING, logger="shared_cache"):
        assert b.get(KEY) is None
    assert "dropped damaged shared record" in caplog.text
    assert b.store.list_keys() == []  # deleted, so the next put replaces it
    b.put(KEY, _arrays(), compute_seconds=1.0)  # what the engine does after a miss
    assert a.local is not None
    a.local.clear()
    assert a.get(KEY) is not None


def test_a_store_that_is_down_leaves_the_local_level_working(
    replicas: tuple[TwoLevelCache, TwoLevelCache], moto: MotoS3
) -> None:
    a, b = replicas
    a.put("b2" * 32, _arrays(1))
    moto.stop()
    try:
        begin = time.monotonic()
        a.put(KEY, _arrays())  # neither raises nor waits long
        assert a.get(KEY) is not None  # the local level has it
        assert b.get(KEY) is None and b.get("b2" * 32) is None  # misses, computed by the engine
        b.put(KEY, _arrays())
        assert b.get(KEY) is not None
        assert time.monotonic() - begin < 5.0
        assert a.stats().as_dict()["shared"]["errors"] >= 1  # type: ignore[index]
    finally:
        moto.start()
    b._outage.succeeded()  # the back-off would skip the store for a few more seconds
    assert b.get("b2" * 32) is not None  # the shared level again


def test_other_weights_never_read_these_records(moto: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    store = open_store(moto.url(f"fp-{time.monotonic_ns()}"), tmp_path)
    old = with_shared_level(None, store, "0" * 64)
    new = with_shared_level(None, store, "1" * 64)
    assert old is not None and new is not None
    old.put(KEY, _arrays())
    assert new.get(KEY) is None and old.get(KEY) is not None


def test_one_host_alone_keeps_its_plain_cache(tmp_path: Path) -> None:
    local = TokenCache(tmp_path, 10**6, FP)
    assert with_shared_level(local, None, FP) is local
    assert with_shared_level(local, open_store(None, tmp_path / "v"), FP) is local


def test_clearing_empties_both_levels(replicas: tuple[TwoLevelCache, TwoLevelCache]) -> None:
    a, b = replicas
    a.put(KEY, _arrays())
    b.clear()
    assert b.store.list_keys() == []
    assert a.local is not None and a.local.get(KEY) is not None  # another replica's own level keeps its copy
    assert b.get(KEY) is None
