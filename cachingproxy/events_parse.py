"""Pure: one SQS message body -> the object events it carries, and which of two events for a key is newer.

Three shapes reach the queue (README "Events"): S3's own notification (`Records[].s3`), the same wrapped in
an SNS envelope (`Type: Notification`, the S3 JSON as the `Message` string; with SNS raw message delivery the
body is the S3 JSON itself), and EventBridge's (`detail-type` "Object Created" / "Object Deleted").
"""

from __future__ import annotations

import datetime
import enum
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Kind", "Malformed", "ObjectEvent", "decode_key", "is_newer", "parse_message", "sequencer_order"]


class Malformed(ValueError):
    """The message is not a notification we can read (a poison message: logged once and deleted)."""


class Kind(enum.Enum):
    CREATED = "created"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """One object changed in one bucket."""

    kind: Kind
    bucket: str
    key: str  # the exact S3 key, decoded
    etag: str  # quoted, as S3 sends it in an ETag header; "" when the event has none (removals)
    sequencer: str  # S3's per-key order (hex); "" when absent
    time: float | None  # epoch seconds S3 gives for the event
    region: str = ""


# S3 event names (records' `eventName`, without "s3:") and EventBridge detail types we act on; others
# (ObjectTagging, ObjectAcl, Restore, Replication...) change no body and are acknowledged and ignored.
_CREATED_PREFIX = "ObjectCreated:"
_REMOVED_PREFIXES = ("ObjectRemoved:", "LifecycleExpiration:")
_EVENTBRIDGE = {"Object Created": Kind.CREATED, "Object Deleted": Kind.REMOVED}


def decode_key(raw: str) -> str:
    """S3 notifications URL-encode keys with '+' for a space (docs: notification-content-structure): '+' is
    a space first, then %XX is a byte of UTF-8; so `a b+c.html` arrives as `a+b%2Bc.html`."""
    try:
        return urllib.parse.unquote_plus(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise Malformed("key is not UTF-8 once decoded") from None


def sequencer_order(sequencer: str) -> str:
    """Sequencers are hex strings that may differ in length; compared after left-padding with zeros (S3 docs)."""
    return sequencer.upper().rjust(64, "0")


def is_newer(event: ObjectEvent, last: ObjectEvent | None) -> bool:
    """Whether `event` should be applied after `last` was, for the same key. Delivery is at least once and
    unordered: an equal event is a duplicate, an older one is late. Without sequencers on both, the event time
    decides, and an equal time with the same ETag and kind is the same event again."""
    if last is None:
        return True
    if event.sequencer and last.sequencer:
        return sequencer_order(event.sequencer) > sequencer_order(last.sequencer)
    if event.time is not None and last.time is not None and event.time != last.time:
        return event.time > last.time
    return (event.kind, event.etag) != (last.kind, last.etag)


def parse_message(body: str) -> tuple[ObjectEvent, ...]:
    """The object events in one SQS message body; () for s3:TestEvent and events that change no object.

    Raises Malformed for anything else, so that one bad message is deleted instead of redelivered for ever.
    """
    doc = _json(body)
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        doc = _json(doc["Message"])  # SNS envelope, raw message delivery off
    if doc.get("Event") == "s3:TestEvent":
        return ()
    if "Records" in doc:
        records = doc["Records"]
        if not isinstance(records, list):
            raise Malformed("Records is not a list")
        return tuple(event for record in records if (event := _record(record)) is not None)
    if "detail-type" in doc:
        event = _eventbridge(doc)
        return () if event is None else (event,)
    raise Malformed("neither an S3, SNS nor EventBridge notification")


def _json(text: str) -> Mapping[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(doc, dict):
        raise Malformed("not a JSON object")
    return doc


def _record(record: Any) -> ObjectEvent | None:
    if not isinstance(record, dict):
        raise Malformed("a record is not an object")
    name = _string(record, "eventName")
    name = name.removeprefix("s3:")
    if name.startswith(_CREATED_PREFIX):
        kind = Kind.CREATED
    elif name.startswith(_REMOVED_PREFIXES):
        kind = Kind.REMOVED
    else:
        return None
    s3 = _table(record, "s3")
    obj = _table(s3, "object")
    return ObjectEvent(
        kind=kind,
        bucket=_string(_table(s3, "bucket"), "name"),
        key=decode_key(_string(obj, "key")),
        etag=_quoted(obj.get("eTag")),
        sequencer=_hex(obj.get("sequencer")),
        time=_time(record.get("eventTime")),
        region=str(record.get("awsRegion") or ""),
    )


def _eventbridge(doc: Mapping[str, Any]) -> ObjectEvent | None:
    if doc.get("source") != "aws.s3":
        raise Malformed("an EventBridge event from another source")
    kind = _EVENTBRIDGE.get(str(doc.get("detail-type")))
    if kind is None:
        return None
    detail = _table(doc, "detail")
    obj = _table(detail, "object")
    # EventBridge's key is the key itself: AWS documents no URL encoding for it (unlike the S3 records above).
    return ObjectEvent(
        kind=kind,
        bucket=_string(_table(detail, "bucket"), "name"),
        key=_string(obj, "key"),
        etag=_quoted(obj.get("etag", obj.get("eTag"))),
        sequencer=_hex(obj.get("sequencer")),
        time=_time(doc.get("time")),
        region=str(doc.get("region") or ""),
    )


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise Malformed(f"{name} is missing or not an object")
    return value


def _string(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise Malformed(f"{name} is missing or not a string")
    return value


def _quoted(etag: Any) -> str:
    """Notifications give the ETag bare; HeadObject and the cache keep it quoted."""
    if not isinstance(etag, str) or not etag:
        return ""
    return etag if etag.startswith('"') else f'"{etag}"'


def _hex(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return ""
    try:
        int(value, 16)
    except ValueError:
        raise Malformed("sequencer is not hex") from None
    return value


def _time(value: Any) -> float | None:
    """ISO 8601 ("2024-05-01T12:00:00.123Z") from S3 and EventBridge; also epoch seconds (moto's EventBridge)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()
