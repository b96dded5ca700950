"""Where shared state lives: a directory on this host, or an S3-compatible object store.

The voices (``engine.voices``), the consent recordings (``engine.custom_voices``) and the shared
level of the prompt cache (``shared_cache``) keep whole objects under keys and never need more
than get, put, delete and a listing. So they see one small interface, ``ObjectStore``, and a
deployment picks its backend with one setting (``--store-url``): unset, everything stays on
local disk exactly as a single server keeps it; ``s3://bucket/prefix``, every replica of a
scaled-out deployment sees the same voices and the same prompt records (docs/scale-out.md).

What every backend promises, because the callers rely on it:

* a ``put`` is all or nothing: a reader, or a listing, sees the old object or the new one whole,
  never a part (a local file is renamed into place; an S3 PUT is atomic);
* ``get`` returns exactly the bytes that were put, or raises ``CorruptObjectError``: the S3
  backend stores each object's sha256 in its metadata and checks it on every read, since not
  every S3-compatible server verifies what it received (moto does not; AWS and MinIO check the
  Content-MD5 we also send);
* a store that cannot be reached or refuses raises ``StoreError`` quickly (one connect timeout,
  one retry), never hangs a request; the callers turn that into a 503 for what an operator asked
  for, and into "skip the store" for what is only an optimisation;
* credentials come from the environment (boto3's own chain: ``AWS_ACCESS_KEY_ID``, a profile, a
  pod's IAM role) and are never logged or put in a message.

Why boto3 and not fsspec/s3fs: the calls are five plain synchronous ones made from worker
threads; s3fs runs aiobotocore on an event loop of its own behind its sync facade and pins an
older botocore, for nothing we would use. boto3 is imported only when an ``s3://`` URL is opened,
so a server on local disk never loads it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fsutil import WriterTemps

logger = logging.getLogger(__name__)

TEMP_DIR = ".tmp"  # a LocalDirStore's temp files: a name no key segment can have
SHA256_META = "sha256"  # the S3 object metadata holding the sha256 of its body (x-amz-meta-sha256)
CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 5.0
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class StoreError(Exception):
    """The store cannot do what was asked: unreachable, refused (permissions, a full disk), or
    misconfigured. ``detail`` is the short cause, safe to show a client (an OS error's text, an S3
    error code, an exception class: no paths, hosts or keys); ``location`` names the store for the
    operator's log."""

    def __init__(self, detail: str, location: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{location}: {detail}")
        self.detail = detail
        self.location = location
        self.unreachable = unreachable

    @property
    def reason(self) -> str:
        """What happened, for a client: ``unreachable (EndpointConnectionError)``, ``refused (AccessDenied)``."""
        return f"{'unreachable' if self.unreachable else 'refused'} ({self.detail})"


class CorruptObjectError(Exception):
    """The bytes under a key are not the bytes that were put (checksum mismatch or missing)."""


class ObjectStore(Protocol):
    """Whole objects under ``/``-separated keys; every method may raise ``StoreError``."""

    @property
    def location(self) -> str:
        """Where the objects live, for logs: a directory or ``s3://bucket/prefix`` (never a secret)."""
        ...

    @property
    def shared(self) -> bool:
        """True when other hosts see the same objects (an object store), False for this host's disk."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, None when there is none; ``CorruptObjectError`` when they fail the check."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` whole, replacing what was there."""
        ...

    def delete(self, key: str) -> bool:
        """Remove the object; False when there was none."""
        ...

    def list_keys(self, prefix: str = "") -> list[str]:
        """The keys directly under ``prefix`` (a ``folder/`` or ""), sorted; deeper keys are left out."""
        ...

    def child(self, name: str) -> ObjectStore:
        """The same store with every key under ``name/``."""
        ...


def check_key(key: str) -> str:
    """A key is ``/``-separated segments of letters, digits, ``._-``, none starting with a dot."""
    parts = key.split("/")
    if not key or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


def open_store(url: str | None, local_dir: Path) -> ObjectStore:
    """The store a deployment configured: ``s3://bucket[/prefix]``, else ``local_dir`` on this host."""
    if not url:
        return LocalDirStore(local_dir)
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"--store-url {url!r} names no bucket (s3://bucket/prefix)")
        return S3Store(bucket, prefix)
    raise ValueError(f"--store-url must be s3://bucket/prefix, got {url!r}")


# --------------------------------------------------------------------------- local disk


class LocalDirStore:
    """Files under a directory: ``<root>/<key>``, written durably through a temp file and a rename.

    The layout is the one a single server has always had (a voice is ``<voices-dir>/<name>.npz``),
    so pointing a server at an existing directory finds everything in it. Nothing is created
    until the first ``put``, so a read-only directory opens and serves what it holds.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._temps = WriterTemps(self.root / TEMP_DIR)
        self._children: dict[str, LocalDirStore] = {}
        self._children_lock = threading.Lock()
        with contextlib.suppress(OSError):  # a read-only directory holds no temp files to remove
            self._temps.reap()

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def shared(self) -> bool:
        return False

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()  # one open: a later replace cannot mix versions
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc) from exc

    def put(self, key: str, data: bytes) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._temps.reap()
            self._temps.replace(key.replace("/", "_").replace(".", "_"), data, target)
        except OSError as exc:
            raise self._error(exc) from exc

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(exc) from exc
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        folder = self.root / prefix.rstrip("/") if prefix else self.root
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._error(exc) from exc
        return sorted(
            f"{prefix}{e.name}" for e in entries if _SEGMENT.fullmatch(e.name) and e.is_file(follow_symlinks=False)
        )

    def child(self, name: str) -> LocalDirStore:
        """The store under ``name/``, made once per name: a store holds a writer lock (an open file)
        from its first put on, so callers that ask for a child per request must get the same one."""
        with self._children_lock:
            found = self._children.get(name)
            if found is None:
                found = self._children[name] = LocalDirStore(self._path(name))
            return found

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _error(self, exc: OSError) -> StoreError:
        return StoreError(exc.strerror or str(exc), str(self.root))


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class _S3Client:
    """One boto3 client per process and endpoint: boto3 clients are thread-safe and hold the pool."""

    client: Any
    endpoint: str


_clients: dict[str, _S3Client] = {}
_clients_lock = threading.Lock()


def _s3_client() -> _S3Client:
    """A boto3 S3 client configured for fast failure; the endpoint and credentials come from the
    environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for MinIO, Ceph, GCS interop...)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    # botocore logs request headers (the access key id) and credential lookups at DEBUG: whatever
    # level the root logger has (an operator's --log-level debug), these stay at WARNING
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        lib = logging.getLogger(name)
        if lib.level < logging.WARNING:
            lib.setLevel(logging.WARNING)
    with _clients_lock:
        if endpoint in _clients:
            return _clients[endpoint]
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            # one retry: a pooled connection the server closed (a restart) fails once, then works
            retries={"total_max_attempts": 2, "mode": "standard"},
            max_pool_connections=32,
            # an endpoint of our own (MinIO, Ceph, moto) serves path-style; AWS prefers virtual hosts
            s3={"addressing_style": "path" if endpoint else "auto"},
            # botocore's default CRC trailers are refused by some S3-compatible servers: our own
            # sha256 (metadata) and Content-MD5 cover integrity instead
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)
        _clients[endpoint] = _S3Client(client, endpoint)
        return _clients[endpoint]


class S3Store:
    """Objects in a bucket under a prefix; each carries the sha256 of its body in its metadata."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        if self.prefix:
            check_key(self.prefix)
            self.prefix += "/"
        self._s3 = _s3_client()

    @property
    def location(self) -> str:
        where = f" at {self._s3.endpoint}" if self._s3.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    @property
    def shared(self) -> bool:
        return True

    def get(self, key: str) -> bytes | None:
        name = self.prefix + check_key(key)
        try:
            response = self._call(self._s3.client.get_object, Bucket=self.bucket, Key=name)
        except _MissingError:
            return None
        try:
            data: bytes = response["Body"].read()
        except Exception as exc:  # the connection dropped mid-body
            raise self._failure(exc) from exc
        expected = (response.get("Metadata") or {}).get(SHA256_META)
        if expected != hashlib.sha256(data).hexdigest():
            raise CorruptObjectError(f"s3://{self.bucket}/{name}: the body does not match its sha256")
        return data

    def put(self, key: str, data: bytes) -> None:
        self._call(
            self._s3.client.put_object,
            Bucket=self.bucket,
            Key=self.prefix + check_key(key),
            Body=data,
            ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            Metadata={SHA256_META: hashlib.sha256(data).hexdigest()},
        )

    def delete(self, key: str) -> bool:
        name = self.prefix + check_key(key)
        try:  # S3's DELETE answers the same whether or not the key existed
            self._call(self._s3.client.head_object, Bucket=self.bucket, Key=name)
        except _MissingError:
            return False
        self._call(self._s3.client.delete_object, Bucket=self.bucket, Key=name)
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        start = self.prefix + prefix
        found: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(self._s3.client.list_objects_v2, Bucket=self.bucket, Prefix=start, Delimiter="/", **extra)
            found += [prefix + o["Key"][len(start) :] for o in page.get("Contents", ())]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(k for k in found if _SEGMENT.fullmatch(k.rsplit("/", 1)[-1]))

    def child(self, name: str) -> S3Store:
        return S3Store(self.bucket, self.prefix + check_key(name))

    def _call(self, method: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return method(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise _MissingError from None
            raise StoreError(code or "error", self.location) from exc
        except Exception as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: Exception) -> StoreError:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", self.location)
        # connection refused, a timeout, a connection closed mid-answer: the store is not there now
        return StoreError(exc.__class__.__name__, self.location, unreachable=True)


class _MissingError(Exception):
    """The key has no object (S3's 404), turned into None / False by the methods."""


# --------------------------------------------------------------------------- outages


class Backoff:
    """After a store failed, skip it for a while where it is only an optimisation.

    A store that is down answers in milliseconds (connection refused) but a hung one takes the
    connect timeout per call: without this, every request would pay it. What an operator asked
    for (registering a voice) always tries; a cache lookup or the check for an operator's voice
    of an OpenAI name does not, until ``seconds`` after the last failure.
    """

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self._until = 0.0

    def skipping(self) -> bool:
        return time.monotonic() < self._until

    def failed(self) -> None:
        self._until = time.monotonic() + self.seconds

    def succeeded(self) -> None:
        self._until = 0.0
