"""The storage interface on both backends: this host's disk, and a real S3-compatible server (moto).

Shows what the voices and the shared cache rely on: whole objects, a listing of direct children
only, checksums checked on read, a store that is down failing fast and working again when it
is back, and credentials that never reach a log line or a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from object_store import CorruptObjectError, LocalDirStore, ObjectStore, S3Store, StoreError, check_key, open_store
from tests.s3_server import ACCESS_KEY, SECRET_KEY, MotoS3


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_env(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    return moto


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalDirStore(tmp_path / "store")
    moto: MotoS3 = request.getfixturevalue("s3_env")
    return open_store(moto.url(f"t-{time.monotonic_ns()}"), tmp_path)


def test_objects_round_trip_and_listings_show_direct_children(store: ObjectStore) -> None:
    assert store.get("a.npz") is None and store.list_keys() == []
    store.put("b.npz", b"second")
    store.put("a.npz", b"first")
    store.put("a.npz", b"first, replaced")
    store.put("nested/c.npz", b"deeper")
    assert store.get("a.npz") == b"first, replaced"
    assert store.list_keys() == ["a.npz", "b.npz"]  # nested/ is not a key of this level
    assert store.list_keys("nested/") == ["nested/c.npz"]
    child = store.child("nested")
    assert child.get("c.npz") == b"deeper" and child.list_keys() == ["c.npz"]
    assert store.delete("a.npz") is True and store.delete("a.npz") is False
    assert store.get("a.npz") is None and store.list_keys() == ["b.npz"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_a_local_child_asked_for_per_request_holds_one_writer_lock(tmp_path: Path) -> None:
    """The voices route asks for ``store.child("consents")`` per request: each write must not leave
    one more open lock descriptor and ``.lock`` file behind."""
    store = LocalDirStore(tmp_path / "store")
    assert store.child("consents") is store.child("consents")
    store.child("consents").put("first.npz", b"warm-up")  # the child's writer lock, taken once
    before = _open_fds()
    for i in range(50):
        store.child("consents").put(f"c{i}.npz", b"consent")
    assert _open_fds() == before
    assert len(list((tmp_path / "store" / "consents" / ".tmp").glob("*.lock"))) == 1


@pytest.mark.parametrize("key", ["", "../x", "a/../b", ".hidden", "a//b", "a b", "ü"])
def test_keys_cannot_escape_the_store(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_an_object_whose_bytes_changed_behind_the_store_is_refused(s3_env: MotoS3, tmp_path: Path) -> None:
    store = open_store(s3_env.url("corrupt"), tmp_path)
    store.put("v.npz", b"the real bytes")
    raw = s3_env.client()
    head = raw.head_object(Bucket=s3_env.bucket, Key="corrupt/v.npz")
    # the same metadata (the old sha256) over other bytes: a server that stored a damaged body
    raw.put_object(Bucket=s3_env.bucket, Key="corrupt/v.npz", Body=b"the real bytez", Metadata=head["Metadata"])
    with pytest.raises(CorruptObjectError):
        store.get("v.npz")
    raw.put_object(Bucket=s3_env.bucket, Key="corrupt/w.npz", Body=b"no checksum at all")
    with pytest.raises(CorruptObjectError):
        store.get("w.npz")


def test_a_store_that_is_down_fails_fast_and_works_when_back(s3_env: MotoS3, tmp_path: Path) -> None:
    store = open_store(s3_env.url("outage"), tmp_path)
    store.put("kept.npz", b"kept")
    s3_env.stop()
    try:
        for call in (lambda: store.get("kept.npz"), lambda: store.put("new.npz", b"x"), store.list_keys):
            begin = time.monotonic()
            with pytest.raises(StoreError) as refused:
                call()
            assert time.monotonic() - begin < 3.0
            assert refused.value.unreachable and refused.value.reason.startswith("unreachable")
    finally:
        s3_env.start()
    assert store.get("kept.npz") == b"kept"  # the same client: its pooled connections recover
    store.put("new.npz", b"x")
    assert store.list_keys() == ["kept.npz", "new.npz"]


def test_credentials_never_reach_logs_or_messages(
    s3_env: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):  # even an operator's --log-level debug
        store = open_store(s3_env.url("secret"), tmp_path)
        store.put("a.npz", b"x")
        store.get("a.npz")
        s3_env.stop()
        try:
            with pytest.raises(StoreError) as refused:
                store.get("a.npz")
        finally:
            s3_env.start()
    assert caplog.records, "nothing was logged at DEBUG: the check would prove nothing"
    for text in (caplog.text, str(refused.value), refused.value.reason):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_no_credentials_is_a_clear_refusal(moto: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint + "/")  # another endpoint string: a new client
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    store = S3Store(moto.bucket, "nocreds")
    with pytest.raises(StoreError, match="no credentials"):
        store.list_keys()


def test_urls_pick_the_backend(tmp_path: Path, s3_env: MotoS3) -> None:
    assert isinstance(open_store(None, tmp_path), LocalDirStore)
    s3 = open_store("s3://bucket-name/a/b", tmp_path)
    assert isinstance(s3, S3Store) and s3.prefix == "a/b/" and s3.shared
    assert s3.location.startswith("s3://bucket-name/a/b/ at http://127.0.0.1:")
    for bad in ("http://x/y", "s3:///prefix"):
        with pytest.raises(ValueError):
            open_store(bad, tmp_path)
