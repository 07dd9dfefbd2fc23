"""S3 access over one aiobotocore client; the only module that sees botocore, and where its errors end."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import email.utils
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.httpchecksum import AioStreamingChecksumBody
from aiobotocore.session import AioSession
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    FlexibleChecksumError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.httpchecksum import Crc32Checksum

from . import botodata
from .config import S3Config
from .counters import Counters
from .models import ObjectMeta

__all__ = [
    "FORWARDED_HEADERS",
    "BodyCorrupt",
    "BucketMissing",
    "Folder",
    "ListedObject",
    "ObjectBody",
    "ObjectMissing",
    "OriginDenied",
    "OriginError",
    "OriginTimeout",
    "OriginUnavailable",
    "S3Origin",
    "client_settings",
    "open_client",
    "share_models",
]

log = logging.getLogger(__name__)

# Representation headers S3 stores with an object and a browser needs; user metadata (x-amz-meta-*) is
# deliberately absent so nothing a publisher sets can be reflected (docs/reliability.md §4, header injection).
FORWARDED_HEADERS = {
    "content-type": "Content-Type",
    "cache-control": "Cache-Control",
    "content-encoding": "Content-Encoding",
    "content-disposition": "Content-Disposition",
    "content-language": "Content-Language",
    "expires": "Expires",
}
_KMS = frozenset({"aws:kms", "aws:kms:dsse"})
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "RequestTimeTooSkewed", "AllAccessDisabled", "InvalidToken"})


class OriginError(Exception):
    """S3 did not give a usable answer."""


class ObjectMissing(OriginError):
    """S3 says the key does not exist."""


class BucketMissing(OriginError):
    """S3 says the bucket does not exist (NoSuchBucket): no key in it is missing, so nothing is negative-cached."""


class OriginDenied(OriginError):
    """S3 answered 403: a missing key without ListBucket, or credentials that stopped working."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code  # "AccessDenied" from a GET body; "403" from a body-less HEAD

    @property
    def proves_absence(self) -> bool:
        """Only a GET's AccessDenied body can mean "missing" (docs/reliability.md §0.3); a HEAD 403 never does."""
        return self.code == "AccessDenied"


class OriginUnavailable(OriginError):
    """S3 refused, reset, throttled or answered 5xx."""


class BodyCorrupt(OriginUnavailable):
    """The body failed a checksum (botocore's flexible checksums, or our MD5 of the ETag)."""


class OriginTimeout(OriginError):
    """S3 did not answer within the configured time."""


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    etag: str
    size: int
    last_modified: float | None = None


@dataclass(frozen=True, slots=True)
class Folder:
    """What ListObjectsV2 with a delimiter says about one folder."""

    folders: tuple[str, ...]  # full prefixes, each ending in "/"
    objects: tuple[ListedObject, ...]
    truncated: bool  # more than the pages read


def _listed_time(value: Any) -> float | None:
    return value.timestamp() if hasattr(value, "timestamp") else None


def _last_modified(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return email.utils.parsedate_to_datetime(value).timestamp()
    return None


def meta_from_headers(headers: Mapping[str, str]) -> ObjectMeta:
    """ObjectMeta from S3's raw response headers (lower-case names, as botocore reports them)."""
    forwarded = tuple(
        (name, headers[raw])
        for raw, name in FORWARDED_HEADERS.items()
        if raw in headers and not _UNSAFE_VALUE.search(headers[raw])
    )
    encrypted = (headers.get("x-amz-server-side-encryption", "") in _KMS
                 or "x-amz-server-side-encryption-customer-algorithm" in headers)
    redirect = headers.get("x-amz-website-redirect-location", "")
    return ObjectMeta(
        redirect="" if _UNSAFE_VALUE.search(redirect) else redirect,
        etag=headers.get("etag", ""),
        size=int(headers.get("content-length", "0")),
        last_modified=_last_modified(headers.get("last-modified")),
        headers=forwarded,
        encrypted=encrypted,
    )


@contextlib.contextmanager
def _translated(op: str, key: str) -> Iterator[None]:
    """Turn every botocore/aiohttp failure into one of our four errors; nothing above sees their text."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            raise BucketMissing(code) from None
        if code in _MISSING_CODES or status == 404:
            raise ObjectMissing(key) from None
        if code in _DENIED_CODES or status == 403:
            log.warning("s3 %s denied (%s) for a key", op, code or status)
            raise OriginDenied(code or str(status)) from None
        log.warning("s3 %s failed: %s %s", op, status, code)
        raise OriginUnavailable(f"{status} {code}") from None
    except NoCredentialsError:
        # Raised before anything is sent: the credential chain found nothing. A denial, not an outage.
        raise OriginDenied("NoCredentialsError") from None
    except FlexibleChecksumError:
        log.error("s3 %s body failed its checksum", op)
        raise BodyCorrupt(op) from None
    except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
        log.warning("s3 %s timed out: %s", op, exc.__class__.__name__)
        raise OriginTimeout(op) from None
    except (asyncio.CancelledError, OriginError):
        raise
    except Exception as exc:
        # EndpointConnectionError, ConnectionClosedError, aiohttp payload errors, truncated streams...
        log.warning("s3 %s unavailable: %s", op, exc.__class__.__name__)
        raise OriginUnavailable(exc.__class__.__name__) from None


class ObjectBody:
    """A GetObject response whose body must be read in bounded chunks and always closed.

    `checked`: botocore verifies this body against a whole-object checksum S3 sent (x-amz-checksum-crc32 and
    the like, for objects uploaded with one: every SDK upload since 2025), and `chunks` raises BodyCorrupt at
    the end when it does not match, before the end is reported. A second digest of the same bytes (our MD5
    of the ETag) then proves nothing more and costs the most CPU of a cold fill (0.22 s per 100 MiB here,
    against 0.03 s for the CRC32): see benchmarks/results/cold-large.md.

    `crc32`: S3's whole-object CRC32 when the body is one botocore would check against it and `pieces` can
    read it past botocore; the caller then checks it (a fill does, on its write-behind thread) and nothing
    else does. That takes the CRC32 and a copy per byte off the loop thread: botocore checks on the loop, in
    `read(n)`, which also joins and slices aiohttp's pieces into n-byte chunks.
    """

    def __init__(self, meta: ObjectMeta, body: Any, key: str, read_timeout: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self.meta = meta
        self._body = body
        self._key = key
        self._read_timeout = read_timeout
        # The wrapper botocore puts round a body only when it found a whole-object checksum it can compute (a
        # composite "-N" one of a multipart upload is skipped; CRC64NVME needs awscrt, which we do not install).
        self.checked = isinstance(body, AioStreamingChecksumBody)
        self.crc32: int | None = None
        self._raw: Any = None  # aiohttp's StreamReader under botocore's wrapper, for `pieces`
        if self.checked and isinstance(body.checksum, Crc32Checksum) and headers is not None:
            self.crc32 = _crc32_value(headers.get("x-amz-checksum-crc32", ""))
            raw = getattr(getattr(body, "_raw_stream", None), "content", None)
            if self.crc32 is None or not callable(getattr(raw, "readchunk", None)):
                self.crc32 = None  # not what we can read past botocore: it checks, as for any other checksum
            else:
                self._raw = raw

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        while True:
            # botocore's sock_read bounds each socket read; this also bounds reads that trickle in.
            with _translated("GetObject body", self._key):
                async with asyncio.timeout(self._read_timeout):
                    chunk: bytes = await self._body.read(size)
            if not chunk:
                return
            yield chunk

    async def pieces(self, buffered: int) -> AsyncIterator[bytes]:
        """The body as aiohttp received it, piece by piece (each at most what one recv gave: 256 KiB with
        uvloop), not copied and NOT checked: only when `crc32` is set, and the caller must check it.

        `buffered`: what aiohttp may hold before it stops reading the socket (twice that, then down to it).
        Its default, 64 KiB, paused the socket after every 256 KiB recv and resumed it after every piece
        taken, a loop round and an epoll change each; read(n) raised it to n, which readchunk does not do.
        """
        assert self._raw is not None, "pieces() only for a body with crc32"
        self._raw.set_read_chunk_size(buffered)
        while True:
            with _translated("GetObject body", self._key):
                async with asyncio.timeout(self._read_timeout):
                    chunk, _ = await self._raw.readchunk()
            if not chunk:
                if not self._raw.at_eof():  # readchunk's (b"", False) is its end of stream, so is this
                    continue
                return
            yield chunk

    def close(self) -> None:
        # Releasing the body returns (or closes) the pooled connection: aiobotocore#1061.
        self._body.close()


def _crc32_value(header: str) -> int | None:
    """x-amz-checksum-crc32 as a number; None for anything but the base64 of 4 bytes (a composite "-N" one)."""
    try:
        raw = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


class S3Origin:
    """head/get/list_page on one bucket; keys are full S3 keys (the prefix is already joined)."""

    def __init__(self, client: Any, config: S3Config, counters: Counters | None = None) -> None:
        self._client = client
        self._bucket = config.bucket
        self._deadline = config.request_timeout
        self._read_timeout = config.read_timeout + 1.0
        self._counters = counters
        # What the last GET or LIST said about the bucket: a HEAD's 404 has no body to tell a missing bucket
        # from a missing key, so while the bucket is known to be missing its 404s are read as that.
        self.bucket_missing = False

    async def head(self, key: str) -> ObjectMeta:
        try:
            resp = await self._send("HeadObject", key,
                                    lambda: self._client.head_object(Bucket=self._bucket, Key=key))
        except ObjectMissing:
            if self.bucket_missing:
                raise BucketMissing("NoSuchBucket") from None
            raise
        return meta_from_headers(resp["ResponseMetadata"]["HTTPHeaders"])

    async def get(self, key: str, *, span: tuple[int, int] | None = None, etag: str | None = None) -> ObjectBody:
        """Start a GetObject; the caller reads `chunks()` and must `close()` it.

        `span`: only bytes [first, last] (inclusive), and then `etag` must still be the object's (If-Match),
        so the part is of the version the caller holds the rest of; `meta.size` is then the part's length.
        """
        extra: dict[str, str] = {}
        if span is not None:
            extra["Range"] = f"bytes={span[0]}-{span[1]}"
        if etag is not None:
            extra["IfMatch"] = etag
        resp = await self._send("GetObject", key,
                                lambda: self._client.get_object(Bucket=self._bucket, Key=key, **extra))
        headers = resp["ResponseMetadata"]["HTTPHeaders"]
        # Only a whole object's checksum is the object's: a ranged answer is checked by botocore, if at all.
        return ObjectBody(meta_from_headers(headers), resp["Body"], key, self._read_timeout,
                          headers if span is None else None)

    async def list_page(self, prefix: str, token: str | None = None, *,
                        max_keys: int = 1000) -> tuple[tuple[ListedObject, ...], str | None]:
        """One ListObjectsV2 request: a page of objects and the token for the next page (None at the end)."""
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if token:
            kwargs["ContinuationToken"] = token
        page = await self._send("ListObjectsV2", prefix, lambda: self._client.list_objects_v2(**kwargs))
        items = tuple(ListedObject(key=item["Key"], etag=item["ETag"], size=int(item["Size"]))
                      for item in page.get("Contents", []))
        following = page.get("NextContinuationToken")
        return items, (following if page.get("IsTruncated") and following else None)

    async def list_folder(self, prefix: str, *, max_pages: int = 10) -> Folder:
        """A folder's sub-folders and objects (ListObjectsV2 with delimiter "/", every page up to `max_pages`)."""
        folders: list[str] = []
        objects: list[ListedObject] = []
        token: str | None = None
        for _ in range(max_pages):
            kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._send("ListObjectsV2", prefix, functools.partial(self._client.list_objects_v2, **kwargs))
            folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            objects += [ListedObject(key=item["Key"], etag=item["ETag"], size=int(item["Size"]),
                                     last_modified=_listed_time(item.get("LastModified")))
                        for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return Folder(tuple(folders), tuple(objects), truncated=False)
        return Folder(tuple(folders), tuple(objects), truncated=True)

    async def _send(self, op: str, key: str, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """One S3 operation under the request deadline, with botocore's errors translated and its attempts counted.

        The counting hooks (`_count_attempts`) see each attempt's start and end; one our deadline cut short
        (or a cancelled request) was still received by S3, so it is counted here.
        """
        in_flight: list[str] = []
        token = _IN_FLIGHT.set(in_flight)
        try:
            with _translated(op, key):
                async with asyncio.timeout(self._deadline):
                    answer = await call()
            self.bucket_missing = False
            return answer
        except BucketMissing:
            self.bucket_missing = True
            raise
        finally:
            _IN_FLIGHT.reset(token)
            if self._counters is not None:
                for name in in_flight:
                    self._counters.add(name)


def client_settings(config: S3Config) -> S3Config:
    """What makes two sites' S3 clients interchangeable: everything but the bucket, prefix and breaker."""
    return replace(config, bucket="", prefix="", breaker_threshold=0, breaker_cooldown=1.0)


@asynccontextmanager
async def open_client(config: S3Config, counters: Counters | None = None) -> AsyncIterator[Any]:
    """One aiobotocore client for the app's lifetime, held open across the yield (aiobotocore#806); sites
    with the same `client_settings` share it, and its connection pool."""
    aio_config = AioConfig(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        # total_max_attempts counts the first try; botocore's max_attempts would count only the retries.
        retries={"total_max_attempts": config.max_attempts, "mode": config.retry_mode},
        s3={"addressing_style": config.addressing_style},
        signature_version="s3v4",
        max_pool_connections=config.max_connections,
    )
    session = AioSession(profile=config.profile or None)
    if _shared is not None and session.get_config_variable("data_path") == _shared[0]:
        session.register_component("data_loader", _shared[1])
    async with session.create_client(
        "s3",
        region_name=config.region,
        endpoint_url=config.endpoint_url or None,
        config=aio_config,
    ) as client:
        if counters is not None:
            _count_attempts(client, counters)
        yield client


# (AWS data_path, botocore Loader) made by share_models, or None: each session then loads its own.
_shared: tuple[str | None, Any] | None = None


def share_models() -> None:
    """Parse botocore's S3 model, endpoint rules and partition data once, for every client opened afterwards.

    A session's loader keeps what it parsed, about 12 MiB of dicts for an S3 client, and each new session (one
    per client) parses its own. The zygote calls this before it forks the workers (footprint.py, spawn.py), so
    every worker's clients read one copy-on-write copy; it was parsed again in each worker (footprint.md).
    The loader is warmed by building a client the ordinary way, so it holds whatever this botocore loads; a
    synchronous one with dummy keys, since nothing is sent, no credentials are looked up and no loop runs here.
    """
    global _shared
    session = botocore.session.Session()
    loader = botodata.loader(session.get_config_variable("data_path"))
    session.register_component("data_loader", loader)
    session.create_client("s3", region_name="us-east-1", aws_access_key_id="preload",
                          aws_secret_access_key="preload")
    _shared = (session.get_config_variable("data_path"), loader)


def _count_attempts(client: Any, counters: Counters) -> None:
    """Count each request S3 received, retries included, so the proxy's figures equal S3's.

    botocore emits before-send and then response-received once per HTTP attempt (aiobotocore/endpoint.py
    `_get_response`), the latter with the answer or the exception that replaced it. An attempt whose connection
    was refused or never opened carried no request and is not counted; one abandoned in between (our deadline)
    is left in `_IN_FLIGHT` for `S3Origin._send` to count.
    """

    def sending(event_name: str, **_: Any) -> None:  # must return None: a value would replace the response
        name = _COUNTED.get(event_name.rpartition(".")[2])
        in_flight = _IN_FLIGHT.get()
        if name is not None and in_flight is not None:
            in_flight.append(name)

    def received(event_name: str, exception: Exception | None = None, **_: Any) -> None:
        name = _COUNTED.get(event_name.rpartition(".")[2])
        if name is None:
            return
        in_flight = _IN_FLIGHT.get()
        if in_flight is not None and name in in_flight:
            in_flight.remove(name)
        if not isinstance(exception, _NOT_SENT):
            counters.add(name)

    client.meta.events.register("before-send.s3", sending)
    client.meta.events.register("response-received.s3", received)


# The attempts of the S3 call running in this task that have started and not ended (see _count_attempts).
_IN_FLIGHT: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("s3_in_flight", default=None)
_NOT_SENT = (EndpointConnectionError, ConnectTimeoutError)


# Every operation the proxy sends, and its counter (counters.COUNTERS).
_COUNTED = {"GetObject": "s3_get", "HeadObject": "s3_head", "ListObjectsV2": "s3_list"}
