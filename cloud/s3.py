"""Amazon S3 (and S3-compatible: MinIO, R2, B2) behind the ``Storage`` interface.

Credentials come only from boto3's standard chain (environment, ``~/.aws``, instance or container
role) and never appear in a message. The endpoint is the ``endpoint_url`` argument or, as boto3
itself resolves it, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the shared config file.
"""

from __future__ import annotations

import builtins
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from cloud.storage import AlreadyExists, Storage, StorageError, redact

_MISSING = ("NoSuchKey", "404", "NotFound")
_DENIED = ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")
_CREDENTIAL_SOURCES = "environment, ~/.aws/credentials, or instance role"


class S3Storage(Storage):
    """Keys live under ``s3://bucket/prefix/``; ``list`` returns them relative to that prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.page_size = page_size
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the config file.
        # A session of its own: credentials are resolved afresh (the default session caches them) and
        # client creation stays thread-safe for background uploads.
        self._client: Any = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint = redact(str(self._client.meta.endpoint_url))  # for messages: no user:password@

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: str | None = None, **kwargs: Any) -> S3Storage:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"S3 URI {uri!r} names no bucket; use s3://bucket/prefix")
        return cls(parsed.netloc, parsed.path, endpoint_url=endpoint_url, **kwargs)

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}')"

    # ------------------------------------------------------------------ Storage

    def read(self, key: str) -> bytes:
        with self._errors("read", key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if _code(err) in _MISSING:
                    raise FileNotFoundError(errno.ENOENT, "no such S3 object", self.url(key)) from None
                raise
            return bytes(response["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256")

    def write_new(self, key: str, data: bytes) -> None:
        """Create ``key`` only if it does not exist yet (the manifest commit); StorageError if it does."""
        with self._errors("write", key):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256", IfNoneMatch="*"
                )
            except ClientError as err:
                # 412: it exists; 409: a concurrent conditional write to the same key won the race.
                if _code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise AlreadyExists(f"{self.url(key)} already exists; not overwritten") from None
                raise

    def exists(self, key: str) -> bool:
        with self._errors("check", key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if _code(err) in _MISSING:
                    return False
                raise
            return True

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/")
        search = f"{base}/" if base else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        with self._errors("list", prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=search, PaginationConfig={"PageSize": self.page_size})
            for page in pages:
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def folders(self, prefix: str) -> builtins.list[str]:
        """One level below ``prefix``, from S3's common prefixes (the keys below are not listed)."""
        base = self._key(prefix).rstrip("/")
        search = f"{base}/" if base else ""
        names: builtins.list[str] = []
        with self._errors("list", prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=search, Delimiter="/", PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                names.extend(item["Prefix"][len(search) :].rstrip("/") for item in page.get("CommonPrefixes", []))
        return sorted(names)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))  # S3 deletes are idempotent

    # ------------------------------------------------------------------ helpers

    def _key(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn botocore's exceptions into one line; never include credentials."""
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(f"no AWS credentials found (set them in the {_CREDENTIAL_SOURCES})") from None
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as err:
            raise StorageError(f"cannot reach S3 endpoint {self.endpoint} ({type(err).__name__})") from None
        except ClientError as err:
            code = _code(err)
            if code == "NoSuchBucket":
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist") from None
            if code in _DENIED:
                raise StorageError(
                    f"S3 access denied to bucket {self.bucket!r} ({code}; check AWS credentials: {_CREDENTIAL_SOURCES})"
                ) from None
            message = redact(err.response.get("Error", {}).get("Message") or "no message")
            raise StorageError(f"S3 {action} of {self.url(key)} failed: {code}: {message}") from None
        except BotoCoreError as err:
            detail = f"{type(err).__name__}: {redact(str(err))}"
            raise StorageError(f"S3 {action} of {self.url(key)} failed: {detail}") from None


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))
