"""A real S3-compatible HTTP server for tests: moto in server mode on a loopback port.

Our code talks to it over HTTP through boto3 exactly as to AWS or MinIO, so nothing in the code
under test is replaced. Its objects live in this Python process: ``stop()`` takes the endpoint
away (connections are refused, as for a store that went down) and ``start()`` serves the same
objects again on the same port, which is how the tests stop the store and bring it back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from api.loopback import LOOPBACK

ACCESS_KEY = "AKIATESTSTEPAUDIO0001"
SECRET_KEY = "test-secret-never-logged-0123456789"  # the tests look for it in the logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class MotoS3:
    """``with MotoS3() as s3: s3.env`` (what a process needs to reach it), ``s3.stop()``, ``s3.start()``."""

    def __init__(self, bucket: str = "step-audio") -> None:
        moto_server = pytest.importorskip("moto.server")
        self._server_class = moto_server.ThreadedMotoServer
        self.port = _free_port()
        self.bucket = bucket
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process using the store (credentials by environment, never by argument)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def start(self) -> None:
        self._server = self._server_class(ip_address=LOOPBACK, port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        """A plain boto3 client, for what a test does behind our code's back (corrupting an object)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def __enter__(self) -> MotoS3:
        self.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def s3_environment(monkeypatch: pytest.MonkeyPatch, s3: MotoS3) -> Iterator[None]:
    """This process's environment pointed at ``s3`` for the block (boto3 reads it when a client is made)."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    yield
