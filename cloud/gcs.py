"""Google Cloud Storage behind the ``Storage`` interface: ``gs://bucket/prefix``.

Credentials come from the client library's standard sources (``GOOGLE_APPLICATION_CREDENTIALS``,
application default credentials); with ``STORAGE_EMULATOR_HOST`` set the client talks to that
emulator anonymously. No message raised here contains credentials: errors are mapped to one
line built from the bucket, the key and the exception type, never from the credentials.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlparse

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from google.cloud.storage.retry import DEFAULT_RETRY
from google.resumable_media import DataCorruption, InvalidResponse

from cloud.storage import AlreadyExists, Storage, StorageError

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_CREDENTIALS_HINT = "check GOOGLE_APPLICATION_CREDENTIALS or application default credentials"


class GCSStorage(Storage):
    """Keys live under ``gs://<bucket>/<prefix>/``; every request has a timeout and a bounded retry."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: gcs.Client | None = None,
        timeout: float = 60.0,
        deadline: float = 120.0,
    ) -> None:
        if not bucket:
            raise StorageError("GCS bucket name is missing; use gs://bucket/prefix")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.timeout = timeout  # seconds per HTTP request
        self.retry = DEFAULT_RETRY.with_timeout(deadline)  # seconds of retries, all attempts together
        self.deadline = deadline
        self.client = client if client is not None else _make_client()
        self.bucket = self.client.bucket(bucket)

    @classmethod
    def from_uri(cls, uri: str, *, timeout: float = 60.0, deadline: float = 120.0) -> GCSStorage:
        parsed = urlparse(uri)
        if parsed.scheme != "gs":
            raise StorageError(f"not a GCS URI: {uri!r}; use gs://bucket/prefix")
        if not parsed.netloc:
            raise StorageError(f"GCS URI {uri!r} has no bucket name; use gs://bucket/prefix")
        return cls(parsed.netloc, parsed.path, timeout=timeout, deadline=deadline)

    def __repr__(self) -> str:
        return f"GCSStorage('gs://{self.bucket_name}/{self.prefix}')"

    def url(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def _name(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else self.prefix or key

    def read(self, key: str) -> bytes:
        blob = self.bucket.blob(self._name(key))
        with self._errors():
            try:
                data: bytes = blob.download_as_bytes(timeout=self.timeout, retry=self.retry)
                return data
            except api_exceptions.NotFound:
                if not self._bucket_exists():
                    raise
        raise FileNotFoundError(f"gs://{self.bucket_name}/{blob.name} does not exist")

    def write(self, key: str, data: bytes) -> None:
        # Overwriting with the same bytes is idempotent, so the upload may be retried.
        with self._errors():
            self.bucket.blob(self._name(key)).upload_from_string(data, timeout=self.timeout, retry=self.retry)

    def write_new(self, key: str, data: bytes) -> None:
        """Create ``key`` only if no object has that name (``if_generation_match=0``), e.g. a manifest."""
        name = self._name(key)
        with self._errors():
            try:
                self.bucket.blob(name).upload_from_string(
                    data, if_generation_match=0, timeout=self.timeout, retry=self.retry
                )
            except api_exceptions.PreconditionFailed:
                raise AlreadyExists(f"gs://{self.bucket_name}/{name} already exists; not overwritten") from None

    def exists(self, key: str) -> bool:
        with self._errors():
            found: bool = self.bucket.blob(self._name(key)).exists(timeout=self.timeout, retry=self.retry)
            return found

    def list(self, prefix: str) -> list[str]:
        base = self._name(prefix)
        skip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors():
            blobs = self.client.list_blobs(
                self.bucket, prefix=f"{base}/" if base else None, timeout=self.timeout, retry=self.retry
            )
            return sorted(blob.name[skip:] for blob in blobs if not blob.name.endswith("/"))

    def folders(self, prefix: str) -> builtins.list[str]:
        """One level below ``prefix``, from the listing's prefixes (the objects below are not listed)."""
        base = self._name(prefix)
        search = f"{base}/" if base else ""
        with self._errors():
            blobs = self.client.list_blobs(
                self.bucket, prefix=search or None, delimiter="/", timeout=self.timeout, retry=self.retry
            )
            for _ in blobs.pages:  # prefixes are collected while the pages are read
                pass
            return sorted(name[len(search) :].rstrip("/") for name in blobs.prefixes)

    def delete(self, key: str) -> None:
        with self._errors(), suppress(api_exceptions.NotFound):  # deleting what is gone is fine
            self.bucket.blob(self._name(key)).delete(timeout=self.timeout, retry=self.retry)

    def _bucket_exists(self) -> bool:
        try:
            found: bool = self.bucket.exists(timeout=self.timeout, retry=self.retry)
            return found
        except api_exceptions.Forbidden:
            return True  # allowed to use objects but not to see the bucket: it exists

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn client failures into one-line StorageErrors (built without any exception text)."""
        bucket = self.bucket_name
        try:
            yield
        except api_exceptions.NotFound:
            raise StorageError(f"GCS bucket {bucket!r} does not exist") from None
        except (api_exceptions.Forbidden, api_exceptions.Unauthorized):
            raise StorageError(f"GCS access denied to bucket {bucket!r} ({_CREDENTIALS_HINT})") from None
        except auth_exceptions.RefreshError:
            raise StorageError(
                f"Google Cloud credentials were rejected for bucket {bucket!r} ({_CREDENTIALS_HINT})"
            ) from None
        except api_exceptions.RetryError as err:
            cause = type(err.cause).__name__ if err.cause is not None else "timeout"
            raise StorageError(
                f"cannot reach GCS at {_endpoint()} for bucket {bucket!r} (gave up after {self.deadline:g}s: {cause})"
            ) from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            auth_exceptions.TransportError,
        ) as err:
            raise StorageError(
                f"cannot reach GCS at {_endpoint()} for bucket {bucket!r} ({type(err).__name__})"
            ) from None
        except api_exceptions.GoogleAPICallError as err:
            raise StorageError(f"GCS request to bucket {bucket!r} failed with HTTP {err.code}") from None
        except (DataCorruption, InvalidResponse, auth_exceptions.GoogleAuthError) as err:
            # a checksum mismatch in transfer, an unexpected status, other credential trouble
            raise StorageError(f"GCS request to bucket {bucket!r} failed ({type(err).__name__})") from None


def _make_client() -> gcs.Client:
    try:
        if os.environ.get(EMULATOR_ENV):
            return gcs.Client(
                project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials()
            )
        # No project needed for object operations; credentials come from the standard sources.
        return gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    except auth_exceptions.DefaultCredentialsError:
        # Never the variable's value: it is a path, but people also paste the key itself into it.
        where = "GOOGLE_APPLICATION_CREDENTIALS is set but could not be loaded; " if _credentials_set() else ""
        raise StorageError(
            f"no Google Cloud credentials found ({where}set GOOGLE_APPLICATION_CREDENTIALS to a service account "
            "key file or run `gcloud auth application-default login`)"
        ) from None


def _credentials_set() -> bool:
    return bool(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))


def _endpoint() -> str:
    """Host of the endpoint in use, without any user info that a URL might carry."""
    value = os.environ.get(EMULATOR_ENV) or "https://storage.googleapis.com"
    url = urlparse(value if "//" in value else f"http://{value}")
    if not url.hostname:
        return "storage.googleapis.com"
    return f"{url.hostname}:{url.port}" if url.port else url.hostname
