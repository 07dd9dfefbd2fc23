"""S3 event notifications through SQS, end to end against moto's server: moto 5.2.5 delivers real notifications
from S3 to SQS, from S3 to SNS to SQS and from S3 to EventBridge to an SQS rule target
(put_bucket_notification_configuration), which the proxy's leader consumes; out-of-order sequencers,
duplicates and poison messages are sent with SendMessage (moto's notifications carry no sequencer, or a
constant one on EventBridge)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
from aiohttp.test_utils import TestServer

from cachingproxy.app import EVENTS, create_app, server_kwargs
from cachingproxy.appkeys import COUNTERS
from cachingproxy.config import EventsConfig, parse_config
from cachingproxy.events import EventHealth
from cachingproxy.profiles import profile_problems
from cachingproxy.tally import Slab, Tally

from .conftest import Bucket, FakeClock, MakeProxy, ProxyClient, config_for, service_of, store_of, until
from .shim import Shim

DEADLINE = 15.0  # seconds; moto's long poll answers within wait_seconds (1 s here)


@pytest.fixture(scope="session")
def sqs(moto_url: str) -> Any:
    return boto3.client("sqs", endpoint_url=moto_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def sns(moto_url: str) -> Any:
    return boto3.client("sns", endpoint_url=moto_url, region_name="us-east-1")


class Queue:
    def __init__(self, sqs: Any, name: str) -> None:
        self.sqs = sqs
        self.url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
        self.arn: str = sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]

    def send(self, body: str) -> None:
        self.sqs.send_message(QueueUrl=self.url, MessageBody=body)

    def waiting(self) -> int:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@pytest.fixture
def queue(sqs: Any, bucket: Bucket) -> Iterator[Queue]:
    """A queue receiving the bucket's ObjectCreated and ObjectRemoved notifications directly."""
    q = Queue(sqs, f"q-{uuid.uuid4().hex[:12]}")
    bucket.client.put_bucket_notification_configuration(Bucket=bucket.name, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": q.arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    yield q
    bucket.client.put_bucket_notification_configuration(Bucket=bucket.name, NotificationConfiguration={})
    with_queue = sqs.list_queues(QueueNamePrefix=q.url.rsplit("/", 1)[1]).get("QueueUrls", [])
    if with_queue:
        sqs.delete_queue(QueueUrl=q.url)


def events_section(moto_url: str, queue_url: str, **extra: Any) -> dict[str, Any]:
    return {"queue_url": queue_url, "endpoint_url": moto_url, "wait_seconds": 1, **extra}


def count(proxy: ProxyClient, name: str) -> int:
    return int(proxy.app[COUNTERS].get(name))


async def started(proxy: ProxyClient) -> None:
    """The consumer's sweep at start is done (it LISTs through the shim), so counts after it are the test's."""
    await asyncio.wait_for(proxy.app[EVENTS].swept.wait(), DEADLINE)


async def body_of(proxy: ProxyClient, path: str) -> tuple[int, bytes, str]:
    resp = await proxy.get(path)
    return resp.status, await resp.read(), resp.headers.get("X-Cache", "")


async def applied(proxy: ProxyClient, before: int, n: int = 1) -> None:
    await until(lambda: count(proxy, "events_applied") >= before + n, "the event to be applied")
    await proxy.app[EVENTS].settle()


LONG = {"ttl": 86400.0}


async def test_update_is_served_without_any_head_request(
        make_proxy: MakeProxy, bucket: Bucket, queue: Queue, shim: Shim, moto_url: str) -> None:
    bucket.put("guide/a.html", b"old")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url))
    await started(proxy)
    assert await body_of(proxy, "/docs/guide/a.html") == (200, b"old", "MISS")
    # The put's own notification (and moto's s3:TestEvent) may still be on the queue: let them settle first.
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    shim.reset_counts()
    before = count(proxy, "events_applied")
    bucket.put("guide/a.html", b"new version")
    await applied(proxy, before)
    assert await body_of(proxy, "/docs/guide/a.html") == (200, b"new version", "HIT")
    assert shim.counts == {"GET": 1}  # the refresh: no HeadObject, and the reader's request was a hit


async def test_refresh_off_marks_stale_so_the_next_request_revalidates(
        make_proxy: MakeProxy, bucket: Bucket, queue: Queue, shim: Shim, moto_url: str) -> None:
    bucket.put("a.html", b"old")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url, refresh=False))
    await started(proxy)
    await body_of(proxy, "/docs/a.html")
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    before = count(proxy, "events_applied")
    bucket.put("a.html", b"new")
    await applied(proxy, before)
    shim.reset_counts()
    assert await body_of(proxy, "/docs/a.html") == (200, b"new", "MISS")
    assert shim.counts == {"HEAD": 1, "GET": 1}


async def test_delete_answers_404(make_proxy: MakeProxy, bucket: Bucket, queue: Queue, moto_url: str) -> None:
    bucket.put("gone.html", b"here")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url))
    await started(proxy)
    assert (await body_of(proxy, "/docs/gone.html"))[0] == 200
    # The upload's own event first: counted after `before`, it would pass for the deletion's.
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    before = count(proxy, "events_applied")
    bucket.delete("gone.html")
    await applied(proxy, before)
    assert (await body_of(proxy, "/docs/gone.html"))[0] == 404


@pytest.mark.parametrize("key", ["a b.html", "c++/x+y.html", "100%.html", "café/日本 語.html", "a b+c.html"])
async def test_awkward_keys(make_proxy: MakeProxy, bucket: Bucket, queue: Queue, shim: Shim, moto_url: str,
                            key: str) -> None:
    bucket.put(key, b"old")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url))
    await started(proxy)
    path = "/docs/" + quote(key)
    assert (await body_of(proxy, path))[1] == b"old"
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    before = count(proxy, "events_applied")
    bucket.put(key, b"new")
    await applied(proxy, before)
    shim.reset_counts()
    assert await body_of(proxy, path) == (200, b"new", "HIT")
    assert shim.counts == {}


async def test_sns_fan_out_to_two_queues_feeding_two_proxies(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, sns: Any, moto_url: str, tmp_path: Path) -> None:
    topic = sns.create_topic(Name=f"t-{uuid.uuid4().hex[:12]}")["TopicArn"]
    queues = [Queue(sqs, f"office-{i}-{uuid.uuid4().hex[:8]}") for i in range(2)]
    for q, raw in zip(queues, ("false", "true"), strict=True):  # one office with raw delivery, one without
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=q.arn, Attributes={"RawMessageDelivery": raw})
    bucket.client.put_bucket_notification_configuration(Bucket=bucket.name, NotificationConfiguration={
        "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    bucket.put("a.html", b"old")
    proxies = [await make_proxy(cache={**LONG, "directory": str(tmp_path / f"office{i}")},
                                events=events_section(moto_url, q.url)) for i, q in enumerate(queues)]
    for proxy in proxies:
        await started(proxy)
        assert (await body_of(proxy, "/docs/a.html"))[1] == b"old"
    for q in queues:
        await until(lambda q=q: q.waiting() == 0, "the queues to drain")  # type: ignore[misc]
    befores = [count(p, "events_applied") for p in proxies]
    bucket.put("a.html", b"new")
    for proxy, before in zip(proxies, befores, strict=True):
        await applied(proxy, before)
        assert await body_of(proxy, "/docs/a.html") == (200, b"new", "HIT")


def eventbridge(bucket: str, key: str, detail_type: str, sequencer: str, etag: str = "") -> str:
    obj: dict[str, Any] = {"key": key, "size": 3, "sequencer": sequencer}
    if etag:
        obj["etag"] = etag.strip('"')
    return json.dumps({"version": "0", "id": str(uuid.uuid4()), "detail-type": detail_type, "source": "aws.s3",
                       "account": "123456789012", "time": "2026-12-03T09:00:00Z", "region": "us-east-1",
                       "resources": [f"arn:aws:s3:::{bucket}"],
                       "detail": {"version": "0", "bucket": {"name": bucket}, "object": obj, "reason": "x"}})


async def test_eventbridge_and_out_of_order_sequencers(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, shim: Shim, moto_url: str) -> None:
    q = Queue(sqs, f"eb-{uuid.uuid4().hex[:12]}")  # no bucket notification: only what the test sends
    bucket.put("a.html", b"old")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, q.url))
    await started(proxy)
    await body_of(proxy, "/docs/a.html")
    etag = bucket.put("a.html", b"new")
    before = count(proxy, "events_applied")
    q.send(eventbridge(bucket.name, "a.html", "Object Created", "0B", etag))
    await applied(proxy, before)
    # A delete that happened before the put (lower sequencer, and shorter: padded it is still lower) arrives late.
    ignored = count(proxy, "events_ignored")
    q.send(eventbridge(bucket.name, "a.html", "Object Deleted", "A"))
    await until(lambda: count(proxy, "events_ignored") > ignored, "the late delete to be ignored")
    shim.reset_counts()
    assert await body_of(proxy, "/docs/a.html") == (200, b"new", "HIT")
    assert shim.counts == {}
    # A later one (longer sequencer) applies.
    before = count(proxy, "events_applied")
    q.send(eventbridge(bucket.name, "a.html", "Object Deleted", "100"))
    await applied(proxy, before)
    assert count(proxy, "events_applied") == before + 1


async def test_duplicates_and_events_for_no_site_are_ignored(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, moto_url: str) -> None:
    q = Queue(sqs, f"dup-{uuid.uuid4().hex[:12]}")
    etag = bucket.put("a.html", b"v1")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, q.url))
    await started(proxy)
    await body_of(proxy, "/docs/a.html")
    record = {"eventName": "ObjectCreated:Put", "eventTime": "2026-12-03T09:00:00.000Z", "awsRegion": "us-east-1",
              "s3": {"bucket": {"name": bucket.name}, "object": {"key": "a.html", "eTag": etag.strip('"'),
                                                                 "sequencer": "00AA"}}}
    message = json.dumps({"Records": [record]})
    other = json.dumps({"Records": [{**record, "s3": {**record["s3"], "bucket": {"name": "someone-else"}}}]})
    applied_before, ignored_before = count(proxy, "events_applied"), count(proxy, "events_ignored")
    for body in (message, message, other):
        q.send(body)
    await until(lambda: count(proxy, "events_applied") + count(proxy, "events_ignored")
                >= applied_before + ignored_before + 3, "three events")
    assert count(proxy, "events_applied") == applied_before + 1
    assert count(proxy, "events_ignored") == ignored_before + 2
    await until(lambda: q.waiting() == 0, "every message deleted")


async def test_poison_message_is_logged_once_counted_and_deleted(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, moto_url: str, caplog: pytest.LogCaptureFixture) -> None:
    q = Queue(sqs, f"poison-{uuid.uuid4().hex[:12]}")
    proxy = await make_proxy(events=events_section(moto_url, q.url))
    await started(proxy)
    secret = "secret-body-text"
    with caplog.at_level(logging.WARNING, logger="cachingproxy.events"):
        q.send(f"{{not json {secret}")
        await until(lambda: count(proxy, "events_malformed") == 1, "the poison message")
        await until(lambda: q.waiting() == 0, "the poison message deleted")
    lines = [r.getMessage() for r in caplog.records if "not a notification" in r.getMessage()]
    assert len(lines) == 1
    assert secret not in lines[0]


async def test_queue_deleted_while_running(
        make_proxy: MakeProxy, bucket: Bucket, queue: Queue, shim: Shim, clock: FakeClock, moto_url: str) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url, fallback_ttl=30.0))
    await started(proxy)
    await until(lambda: proxy.app[EVENTS].healthy, "the first receive")
    ready = await proxy.get("/readyz")
    assert (ready.status, (await ready.json())["events"]) == (200, "ok")
    await body_of(proxy, "/docs/a.html")
    clock.advance(31)
    shim.reset_counts()
    assert await body_of(proxy, "/docs/a.html") == (200, b"a", "HIT")  # healthy: the day-long TTL holds
    errors = count(proxy, "events_queue_errors")
    queue.sqs.delete_queue(QueueUrl=queue.url)
    await until(lambda: count(proxy, "events_queue_errors") > errors, "a queue error")
    ready = await proxy.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "degraded", "cache": "ok", "s3": "ok", "events": "unreachable",
                                  "reason": "events: the queue cannot be read, every TTL is capped at fallback_ttl"}
    shim.reset_counts()  # /readyz's own LIST
    # fallback_ttl takes over: the entry was checked 31 s ago, more than 30.
    assert await body_of(proxy, "/docs/a.html") == (200, b"a", "REVALIDATED")
    assert shim.counts == {"HEAD": 1}


async def test_events_that_arrived_while_stopped_are_applied_after_restart(
        make_proxy: MakeProxy, bucket: Bucket, queue: Queue, moto_url: str) -> None:
    # A long poll cut short by the shutdown may still take a message server-side (moto does, as SQS can); it
    # comes back after the visibility timeout, made short here.
    queue.sqs.set_queue_attributes(QueueUrl=queue.url, Attributes={"VisibilityTimeout": "2"})
    bucket.put("a.html", b"old")
    sections = {"cache": LONG, "events": events_section(moto_url, queue.url)}
    first = await make_proxy(**sections)
    await started(first)
    await body_of(first, "/docs/a.html")
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    await first.close()
    bucket.put("a.html", b"new")
    assert queue.waiting() == 1
    second = await make_proxy(**sections)
    await applied(second, 0)
    assert await body_of(second, "/docs/a.html") == (200, b"new", "HIT")


async def test_sweep_at_start_catches_changes_no_event_announced(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, shim: Shim, moto_url: str) -> None:
    q = Queue(sqs, f"sweep-{uuid.uuid4().hex[:12]}")  # the bucket sends it nothing: every event is "lost"
    bucket.put("same.html", b"same")
    bucket.put("changed.html", b"old")
    bucket.put("deleted.html", b"here")
    sections = {"cache": LONG, "events": events_section(moto_url, q.url)}
    first = await make_proxy(**sections)
    await started(first)
    for name in ("same", "changed", "deleted"):
        await body_of(first, f"/docs/{name}.html")
    await first.close()
    bucket.put("changed.html", b"new")
    bucket.delete("deleted.html")
    second = await make_proxy(**sections)
    await started(second)
    shim.reset_counts()
    assert await body_of(second, "/docs/same.html") == (200, b"same", "HIT")
    assert await body_of(second, "/docs/changed.html") == (200, b"new", "MISS")
    assert shim.counts == {"HEAD": 1, "GET": 1}
    assert (await body_of(second, "/docs/deleted.html"))[0] == 404
    assert await store_of(second).lookup("deleted.html") is None


async def test_only_the_leader_consumes(make_proxy: MakeProxy, sqs: Any, moto_url: str) -> None:
    q = Queue(sqs, f"lead-{uuid.uuid4().hex[:12]}")
    follower = await make_proxy(leader=False, events=events_section(moto_url, q.url))
    assert EVENTS not in follower.app
    # ...yet it reports the events health, which it reads from the shared tally (unhealthy: no leader here).
    body = await (await follower.get("/readyz")).json()
    assert body["events"] == "unreachable"


def test_health_is_shared_between_workers_and_lapses() -> None:
    slab = Slab(rows=2, width=4)
    leader = EventHealth(Tally(["events.healthy_until_ms"], slab, 0), lease=60)
    other = EventHealth(Tally(["events.healthy_until_ms"], slab, 1), lease=60)
    assert not other.ok
    leader.renew()
    assert other.ok
    leader.lost()
    assert not other.ok
    EventHealth(Tally(["events.healthy_until_ms"], slab, 0), lease=-1).renew()  # a lease already over
    assert not other.ok


async def test_another_worker_sees_the_change_and_the_health(
        aiohttp_client: Any, tmp_path: Path, bucket: Bucket, queue: Queue, shim: Shim, clock: FakeClock,
        moto_url: str) -> None:
    """Two workers on one cache and one shared tally, as workers.py runs them: only the leader consumes, and the
    follower both serves what the leader applied and knows the consumer's health."""
    bucket.put("a.html", b"old")
    config = config_for(tmp_path, shim.url, bucket.name, cache=LONG, events=events_section(moto_url, queue.url))
    slab = Slab(rows=2)
    workers = []
    for row in (0, 1):
        server = TestServer(create_app(config, clock=clock, slab=slab, row=row, leader=row == 0))
        await server.start_server(**server_kwargs(config))
        workers.append(await aiohttp_client(server))
    leader, follower = workers
    await started(leader)
    await until(lambda: leader.app[EVENTS].healthy, "the first receive")
    assert (await (await follower.get("/readyz")).json())["events"] == "ok"
    assert (await body_of(follower, "/docs/a.html"))[1] == b"old"
    assert await body_of(follower, "/docs/a.html") == (200, b"old", "HIT")  # now held in its memory
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    before = count(leader, "events_applied")
    bucket.put("a.html", b"new")
    await applied(leader, before)
    assert await body_of(follower, "/docs/a.html") == (200, b"new", "HIT")


async def test_an_event_reaches_each_site_whose_bucket_and_prefix_hold_the_key(
        aiohttp_client: Any, tmp_path: Path, bucket: Bucket, sqs: Any, shim: Shim, clock: FakeClock,
        moto_url: str) -> None:
    q = Queue(sqs, f"sites-{uuid.uuid4().hex[:12]}")
    s3 = {"bucket": bucket.name, "endpoint_url": shim.url, "addressing_style": "path", "max_attempts": 1}
    config = parse_config({
        "s3": s3, "cache": {"directory": str(tmp_path / "cache"), **LONG},
        "events": events_section(moto_url, q.url),
        "sites": [{"name": "guide", "mount": "/guide", "s3": {"prefix": "guide/"}},
                  {"name": "api", "mount": "/api", "s3": {"prefix": "api/"}}],
    }, "test")
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config))
    proxy = await aiohttp_client(server)
    await started(proxy)
    for key in ("guide/a.html", "api/a.html"):
        bucket.put(key, b"old")
    assert (await body_of(proxy, "/guide/a.html"))[1] == b"old"
    assert (await body_of(proxy, "/api/a.html"))[1] == b"old"

    def created(key: str, etag: str, sequencer: str) -> str:
        return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "awsRegion": "us-east-1",
                                        "eventTime": "2026-12-03T09:00:00.000Z",
                                        "s3": {"bucket": {"name": bucket.name},
                                               "object": {"key": key, "eTag": etag.strip('"'),
                                                          "sequencer": sequencer}}}]})

    etag = bucket.put("api/a.html", b"new")
    bucket.put("guide/a.html", b"changed without an event")
    applied_before, ignored_before = count(proxy, "events_applied"), count(proxy, "events_ignored")
    q.send(created("api/a.html", etag, "01"))
    q.send(created("elsewhere/a.html", etag, "02"))  # no site's prefix
    await until(lambda: count(proxy, "events_ignored") > ignored_before, "the event for no site")
    await applied(proxy, applied_before)
    assert await body_of(proxy, "/api/a.html") == (200, b"new", "HIT")
    assert await body_of(proxy, "/guide/a.html") == (200, b"old", "HIT")  # not this site's event


async def test_eventbridge_delivered_by_moto(
        make_proxy: MakeProxy, bucket: Bucket, sqs: Any, moto_url: str, shim: Shim) -> None:
    """moto also routes S3 -> EventBridge -> an SQS rule target. Its sequencer is one constant for every event,
    so only one update per key can be shown this way (a second would rightly count as a duplicate)."""
    events = boto3.client("events", endpoint_url=moto_url, region_name="us-east-1")
    q = Queue(sqs, f"ebr-{uuid.uuid4().hex[:12]}")
    rule = f"docs-{uuid.uuid4().hex[:8]}"
    events.put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.s3"],
                                                        "detail": {"bucket": {"name": [bucket.name]}}}))
    events.put_targets(Rule=rule, Targets=[{"Id": "office", "Arn": q.arn}])
    bucket.put("a b.html", b"old")  # before notifications are on: the update below is the key's only event
    bucket.client.put_bucket_notification_configuration(Bucket=bucket.name, NotificationConfiguration={
        "EventBridgeConfiguration": {}})
    try:
        proxy = await make_proxy(cache=LONG, events=events_section(moto_url, q.url))
        await started(proxy)
        assert (await body_of(proxy, "/docs/a%20b.html"))[1] == b"old"
        await until(lambda: q.waiting() == 0, "the queue to drain")
        before = count(proxy, "events_applied")
        bucket.put("a b.html", b"new")
        await applied(proxy, before)
        shim.reset_counts()
        assert await body_of(proxy, "/docs/a%20b.html") == (200, b"new", "HIT")
        assert shim.counts == {}
    finally:
        bucket.client.put_bucket_notification_configuration(Bucket=bucket.name, NotificationConfiguration={})
        events.remove_targets(Rule=rule, Ids=["office"])
        events.delete_rule(Name=rule)


def test_an_events_profile_that_does_not_exist_is_named() -> None:
    assert profile_problems([EventsConfig(queue_url="https://q", profile="office")], key="events.profile") == [
        "events.profile: 'office' is not a profile in the AWS config files"]


async def test_a_locked_cache_leaves_the_message_for_redelivery(
        make_proxy: MakeProxy, bucket: Bucket, queue: Queue, tmp_path: Path, moto_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the index's write lock (RELIABILITY row 19): the entry cannot be marked stale, so the
    message is not deleted; SQS delivers it again after the visibility timeout, and then it applies."""
    queue.sqs.set_queue_attributes(QueueUrl=queue.url, Attributes={"VisibilityTimeout": "1"})
    bucket.put("a.html", b"old")
    proxy = await make_proxy(cache=LONG, events=events_section(moto_url, queue.url, refresh=False))
    await started(proxy)
    await body_of(proxy, "/docs/a.html")
    # Committed: a response may end before its body is indexed, and the lock below would make that commit fail.
    await service_of(proxy).settle()
    await until(lambda: queue.waiting() == 0, "the queue to drain")
    applied_before = count(proxy, "events_applied")
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING, logger="cachingproxy.events"):
            bucket.put("a.html", b"new")
            await until(lambda: any("could not record" in r.getMessage() for r in caplog.records),
                        "the apply to fail")
        assert count(proxy, "events_applied") == applied_before
        assert queue.waiting() == 1  # not deleted
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await applied(proxy, applied_before)
    assert await body_of(proxy, "/docs/a.html") == (200, b"new", "MISS")
    # The same for a delete.
    caplog.clear()
    applied_before = count(proxy, "events_applied")
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING, logger="cachingproxy.events"):
            bucket.delete("a.html")
            await until(lambda: any("could not record" in r.getMessage() for r in caplog.records),
                        "the delete to fail")
        assert count(proxy, "events_applied") == applied_before
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await applied(proxy, applied_before)
    assert (await body_of(proxy, "/docs/a.html"))[0] == 404
