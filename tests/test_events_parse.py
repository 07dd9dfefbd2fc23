"""events_parse: every message shape S3 can put on a queue, exact key decoding, and event order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cachingproxy.events_parse import Kind, Malformed, ObjectEvent, decode_key, is_newer, parse_message


def s3_record(key: str, name: str = "ObjectCreated:Put", etag: str | None = "abc", sequencer: str | None = None,
              bucket: str = "docs", time: str = "2026-12-03T09:00:00.000Z") -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": 5}
    if etag is not None:
        obj["eTag"] = etag
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": time,
            "eventName": name, "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj}}


def s3_message(*records: dict[str, Any]) -> str:
    return json.dumps({"Records": list(records)})


def sns(inner: str) -> str:
    return json.dumps({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t",
                       "Message": inner, "Timestamp": "2026-12-03T09:00:00.000Z"})


def eventbridge(detail_type: str, key: str, **obj: Any) -> str:
    return json.dumps({"version": "0", "id": "x", "detail-type": detail_type, "source": "aws.s3",
                       "account": "111122223333", "time": "2026-12-03T09:00:01Z", "region": "us-east-1",
                       "resources": ["arn:aws:s3:::docs"],
                       "detail": {"version": "0", "bucket": {"name": "docs"},
                                  "object": {"key": key, "size": 5, **obj}, "reason": "PutObject"}})


CREATED = ObjectEvent(Kind.CREATED, "docs", "guide/a.html", '"abc"', "", 1796288400.0, "us-east-1")


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(s3_message(s3_record("guide/a.html")), (CREATED,), id="s3-direct"),
    pytest.param(sns(s3_message(s3_record("guide/a.html"))), (CREATED,), id="sns-raw-delivery-off"),
    pytest.param(s3_message(s3_record("guide/a.html", name="s3:ObjectCreated:Copy")), (CREATED,),
                 id="s3-prefixed-event-name"),
    pytest.param(s3_message(s3_record("guide/a.html", name="ObjectRemoved:Delete", etag=None)),
                 (ObjectEvent(Kind.REMOVED, "docs", "guide/a.html", "", "", 1796288400.0, "us-east-1"),),
                 id="s3-removed"),
    pytest.param(s3_message(s3_record("guide/a.html", name="ObjectRemoved:DeleteMarkerCreated", etag=None)),
                 (ObjectEvent(Kind.REMOVED, "docs", "guide/a.html", "", "", 1796288400.0, "us-east-1"),),
                 id="s3-delete-marker"),
    pytest.param(s3_message(s3_record("a", name="ObjectTagging:Put")), (), id="tagging-changes-no-body"),
    pytest.param(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "x", "Bucket": "docs"}), (),
                 id="s3-test-event"),
    pytest.param(sns(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "docs"})), (),
                 id="s3-test-event-through-sns"),
    pytest.param(eventbridge("Object Created", "guide/a b.html", etag="abc", sequencer="0A"),
                 (ObjectEvent(Kind.CREATED, "docs", "guide/a b.html", '"abc"', "0A", 1796288401.0, "us-east-1"),),
                 id="eventbridge-created-key-verbatim"),
    pytest.param(eventbridge("Object Deleted", "guide/a.html", sequencer="0B"),
                 (ObjectEvent(Kind.REMOVED, "docs", "guide/a.html", "", "0B", 1796288401.0, "us-east-1"),),
                 id="eventbridge-deleted"),
    pytest.param(eventbridge("Object Tags Added", "guide/a.html"), (), id="eventbridge-other-type"),
])
def test_message_shapes(body: str, expected: tuple[ObjectEvent, ...]) -> None:
    assert parse_message(body) == expected


def test_several_records_in_one_message() -> None:
    events = parse_message(s3_message(s3_record("a"), s3_record("b", name="ObjectRemoved:Delete")))
    assert [(e.kind, e.key) for e in events] == [(Kind.CREATED, "a"), (Kind.REMOVED, "b")]


@pytest.mark.parametrize(("raw", "key"), [
    pytest.param("a+b%2Bc.html", "a b+c.html", id="plus-is-space-then-percent"),
    pytest.param("100%25.html", "100%.html", id="percent"),
    pytest.param("caf%C3%A9/%E6%97%A5%E6%9C%AC.html", "café/日本.html", id="utf8"),
    pytest.param("dir/index.html", "dir/index.html", id="plain"),
    pytest.param("a%2Fb", "a/b", id="encoded-slash"),
    pytest.param("%2B%2B", "++", id="only-plus"),
])
def test_key_decoding(raw: str, key: str) -> None:
    assert decode_key(raw) == key
    assert parse_message(s3_message(s3_record(raw)))[0].key == key


@pytest.mark.parametrize("body", [
    pytest.param("not json", id="not-json"),
    pytest.param("[]", id="not-an-object"),
    pytest.param("{}", id="no-known-shape"),
    pytest.param(json.dumps({"Records": "x"}), id="records-not-list"),
    pytest.param(json.dumps({"Records": [1]}), id="record-not-object"),
    pytest.param(json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}), id="no-s3"),
    pytest.param(s3_message(s3_record("%FF")), id="key-not-utf8"),
    pytest.param(s3_message(s3_record("a", sequencer="xyz")), id="sequencer-not-hex"),
    pytest.param(sns("nope"), id="sns-message-not-json"),
    pytest.param(json.dumps({"detail-type": "Object Created", "source": "aws.ec2", "detail": {}}),
                 id="eventbridge-other-source"),
    pytest.param("[" * 100_000, id="deep-nesting"),
])
def test_malformed(body: str) -> None:
    with pytest.raises(Malformed):
        parse_message(body)


def ev(sequencer: str = "", time: float | None = None, etag: str = '"a"', kind: Kind = Kind.CREATED) -> ObjectEvent:
    return ObjectEvent(kind, "docs", "k", etag, sequencer, time)


@pytest.mark.parametrize(("event", "last", "newer"), [
    pytest.param(ev("0A"), None, True, id="first"),
    pytest.param(ev("0B"), ev("0A"), True, id="later-sequencer"),
    pytest.param(ev("0A"), ev("0B"), False, id="earlier-sequencer"),
    pytest.param(ev("0A"), ev("0A"), False, id="duplicate"),
    # S3 docs: sequencers of different lengths compare after left-padding with zeros.
    pytest.param(ev("100"), ev("FF"), True, id="longer-is-larger-after-padding"),
    pytest.param(ev("FF"), ev("0100"), False, id="shorter-is-smaller-after-padding"),
    pytest.param(ev("00FF"), ev("FF"), False, id="same-after-padding"),
    pytest.param(ev("0a"), ev("09"), True, id="hex-case"),
    pytest.param(ev(time=2.0), ev(time=1.0), True, id="no-sequencer-later-time"),
    pytest.param(ev(time=1.0), ev(time=2.0), False, id="no-sequencer-earlier-time"),
    pytest.param(ev(time=1.0), ev(time=1.0), False, id="no-sequencer-duplicate"),
    pytest.param(ev(time=1.0, etag='"b"'), ev(time=1.0), True, id="same-time-other-etag"),
    pytest.param(ev(time=1.0, kind=Kind.REMOVED, etag=""), ev(time=1.0), True, id="same-time-other-kind"),
])
def test_order(event: ObjectEvent, last: ObjectEvent | None, newer: bool) -> None:
    assert is_newer(event, last) is newer
