"""The SQS long-poll client for event notifications: receive a batch, delete a batch. Besides origin.py the only
importer of aiobotocore; botocore's errors end here as QueueError, with no queue URL or AWS text in them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from .config import EventsConfig

__all__ = ["BATCH", "Message", "QueueError", "SqsQueue", "open_queue"]

log = logging.getLogger(__name__)

BATCH = 10  # SQS's maximum per ReceiveMessage and per DeleteMessageBatch


class QueueError(Exception):
    """The queue could not be read or written (credentials, network, a deleted queue)."""


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    receipt: str  # what DeleteMessage needs
    body: str


class SqsQueue:
    """receive() and delete() on one queue."""

    def __init__(self, client: Any, url: str, wait_seconds: int) -> None:
        self._client = client
        self._url = url
        self._wait = wait_seconds

    async def receive(self) -> tuple[Message, ...]:
        """One long poll: up to BATCH messages, or () when none arrived within wait_seconds."""
        resp = await self._call("ReceiveMessage", self._client.receive_message(
            QueueUrl=self._url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=self._wait))
        return tuple(Message(m["MessageId"], m["ReceiptHandle"], m.get("Body", ""))
                     for m in resp.get("Messages", ()))

    async def delete(self, messages: tuple[Message, ...]) -> None:
        """Acknowledge `messages` (at most BATCH); one that fails to delete is simply delivered again."""
        if not messages:
            return
        entries = [{"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(messages)]
        resp = await self._call("DeleteMessageBatch",
                                self._client.delete_message_batch(QueueUrl=self._url, Entries=entries))
        if resp.get("Failed"):
            log.warning("sqs: %d of %d deletes failed; those messages come back", len(resp["Failed"]), len(entries))

    async def _call(self, op: str, call: Any) -> dict[str, Any]:
        try:
            # The long poll itself takes up to wait_seconds; anything well past it is a stuck connection.
            async with asyncio.timeout(self._wait + 30):
                result: dict[str, Any] = await call
                return result
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            log.warning("sqs %s failed: %s", op, code or "error")
            raise QueueError(code) from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            log.warning("sqs %s failed: %s", op, exc.__class__.__name__)
            raise QueueError(exc.__class__.__name__) from None


@asynccontextmanager
async def open_queue(events: EventsConfig, default_region: str) -> AsyncIterator[SqsQueue]:
    """One SQS client for the consumer's lifetime (aiobotocore#806, as origin.open_client)."""
    config = AioConfig(
        connect_timeout=5.0,
        read_timeout=events.wait_seconds + 10.0,  # a long poll holds the response for wait_seconds
        retries={"total_max_attempts": 2, "mode": "standard"},
    )
    session = AioSession(profile=events.profile or None)
    async with session.create_client("sqs", region_name=events.region or default_region,
                                     endpoint_url=events.endpoint_url or None, config=config) as client:
        yield SqsQueue(client, events.queue_url, events.wait_seconds)
