"""The keys of app and request state, in one module so that every face (handlers, monitoring, admin, access
log) can read them without importing each other."""

from __future__ import annotations

import collections

from aiohttp import web

from .config import Config
from .counters import Counters
from .events import EventHealth
from .models import Clock
from .sites import Site, Sites
from .store import CacheStore
from .tally import Tally

__all__ = ["BODY_SENT", "CLIENT", "CLOCK", "CONFIG", "COUNTERS", "EVENTS_HEALTH", "OBJECT_KEY", "S3_CALLS", "SITE",
           "SITES", "STARTED", "STORE", "TALLY"]

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", CacheStore)
SITES = web.AppKey("sites", Sites)
TALLY = web.AppKey("tally", Tally)
COUNTERS = web.AppKey("counters", Counters)
EVENTS_HEALTH = web.AppKey("events_health", EventHealth)  # set only with [events] queue_url

SITE = web.RequestKey("site", Site)  # the site the request was routed to
# The client's address when a trusted proxy said it (forwarded.py); unset: the peer's, request.remote.
CLIENT = web.RequestKey("client", str)
S3_CALLS = web.RequestKey("s3_calls", collections.Counter)  # S3 requests made for this request, by operation
OBJECT_KEY = web.RequestKey("object_key", str)  # the S3 key an object response is for (compressed.py)
BODY_SENT = web.RequestKey("body_sent", int)  # object body bytes an object response delivered in full
# time.perf_counter() when the object handler began. aiohttp's own request time comes from loop.time(),
# which under uvloop moves in whole milliseconds: a 0.3 ms hit would be logged and binned as 0 or 1 ms.
STARTED = web.RequestKey("started", float)
