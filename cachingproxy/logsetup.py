"""Logging for the served process: a cheap timestamp, one-line 400s, an access log of bare lines that never
interleave across workers, and records written off the event loop."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "ACCESS_LOGGER",
    "AtomicLines",
    "LogFormatter",
    "MaskSecrets",
    "OneLineBadRequests",
    "access_lines",
    "configure_logging",
    "logging_off_the_loop",
]

ACCESS_LOGGER = "aiohttp.access"  # the logger aiohttp hands the access logger class
PIPE_BUF = 4096  # Linux: a write of at most this many bytes to a pipe is atomic (pipe(7))


class LogFormatter(logging.Formatter):
    """logging.Formatter whose timestamp is built once per second: strftime per record was a third of
    what formatting an access-log line cost."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second or datefmt:
            stamp = time.strftime(datefmt or self.default_time_format, self.converter(record.created))
            if datefmt:
                return stamp
            self._second, self._stamp = second, stamp
        msec_format = self.default_msec_format
        return msec_format % (self._stamp, record.msecs) if msec_format else self._stamp


class OneLineBadRequests(logging.Filter):
    """For the `aiohttp.server` logger: aiohttp logs each malformed request it answers 400 with a full
    traceback and the parser's message, which quotes the raw request line or header (a token in an
    `Authorization` header with a stray control character, verbatim). One line instead, with the error kind
    (the exception's class: the parsers' messages embed request bytes, sometimes with no fixed text at all)
    and the client, so a scanner can neither fill the log with stack traces nor put secrets in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError  # a worker has aiohttp loaded already

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # aiohttp's call is log("Error handling request from %s", request.remote, exc_info=exc).
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "malformed request from %s: %s (answered %d and closed)"
            record.args = (str(client), type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
        return True


class MaskSecrets(logging.Filter):
    """For the output handler: whatever any logger was given, the admin token and the values of credential
    headers or URL userinfo never reach the log (issue 17). Runs where the record is formatted, which is the
    log thread (logging_off_the_loop), not the event loop."""

    _CREDENTIALS = re.compile(r"(?i)\b((?:proxy-)?authorization|cookie)(\W{1,3})[^\r\n'\"}]*")
    _USERINFO = re.compile(r"(?i)\b(https?://)[^/@\s'\"]*@")

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = self.mask(text)
        if masked != text:
            record.msg, record.args = masked, None
        return True

    def mask(self, text: str) -> str:
        # Plain substring tests first: most lines (the access log's) contain none of these, and the regexes
        # cost several µs a line on a thread that shares the GIL with the event loop.
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if "://" in text:
            text = self._USERINFO.sub(r"\1***@", text)
        lowered = text.lower()
        if "authorization" in lowered or "cookie" in lowered:
            text = self._CREDENTIALS.sub(r"\1\2***", text)
        return text


class AtomicLines(logging.Handler):
    """The access log's handler: each record's message alone (no timestamp or level prefix: accessline.py
    builds the whole line), written to a file descriptor in single writes of whole lines, at most PIPE_BUF bytes
    each. Workers share one stderr; a buffered stream would split a batch at its buffer's edges, and another
    worker's write could then land inside a line. Lines are kept under PIPE_BUF by accessline.LINE_LIMIT.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        self.write([record])

    def write(self, records: Sequence[logging.LogRecord | str]) -> None:
        """Records, or finished lines (str) that this handler's MaskSecrets filters still mask."""
        masks = [f for f in self.filters if isinstance(f, MaskSecrets)]
        chunk: list[bytes] = []
        size = 0
        for record in records:
            if isinstance(record, str):
                text = record
                for mask in masks:
                    text = mask.mask(text)
            else:
                text = record.getMessage()
            line = (text + "\n").encode("utf-8", "replace")
            if chunk and size + len(line) > PIPE_BUF:
                self._write(b"".join(chunk), record)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk), records[-1])

    def _write(self, data: bytes, record: logging.LogRecord | str) -> None:
        try:
            while data:  # a blocking write of <= PIPE_BUF bytes to a pipe is all or nothing; a file takes it all
                data = data[os.write(self._fd, data):]
        except OSError:
            self.handleError(_record(record) if isinstance(record, str) else record)


class _Batched(logging.Handler):
    """Collects records on the event loop and hands them to the real handlers on one thread, in batches.

    A record costs the loop one list append. The thread wakes every FLUSH_INTERVAL seconds (or when
    FLUSH_RECORDS are waiting), not once per record: a per-record wake-up (logging's QueueListener) made
    the loop and the log thread trade the GIL on every request. What the thread does is what the handlers
    did before (format, write), so a slow stderr (a pipe to journald, a terminal) never stalls a request.
    """

    FLUSH_INTERVAL = 0.2
    FLUSH_RECORDS = 1024

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self._handlers = handlers
        self._pending: list[logging.LogRecord | str] = []  # str: a finished access-log line (`line`)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Every argument our log calls pass is an immutable str or number: formatting later is safe.
        self._pending.append(record)
        if len(self._pending) >= self.FLUSH_RECORDS:
            self._wake.set()

    def line(self, text: str) -> None:
        """A finished access-log line, without a LogRecord: the record, its level checks and its handler
        locks cost more than building the line (`access_lines`). Becomes a record only for a handler that
        is not AtomicLines (none in `cachingproxy serve`)."""
        if self._stopping:  # closed (shutdown): straight to the real handlers, as the logger now does
            record = _record(text)
            for handler in self._handlers:
                handler.handle(record)
            return
        self._pending.append(text)
        if len(self._pending) >= self.FLUSH_RECORDS:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.FLUSH_INTERVAL)
            self._wake.clear()
            self._write()
        self._write()

    def _write(self) -> None:
        batch, self._pending = self._pending, []  # one swap under the GIL: appends land in the new list
        if not batch:
            return
        for handler in self._handlers:
            if isinstance(handler, AtomicLines):
                with handler.lock or contextlib.nullcontext():
                    handler.write([r for r in batch
                                   if isinstance(r, str) or (r.levelno >= handler.level and handler.filter(r))])
                continue
            records = [_record(r) if isinstance(r, str) else r for r in batch]
            records = [r for r in records if r.levelno >= handler.level]
            if type(handler) is not logging.StreamHandler:
                for record in records:
                    handler.handle(record)
                continue
            # A plain stream (stderr): the whole batch in one write and one flush, not one per line.
            lines = []
            for record in records:
                if handler.filter(record):
                    try:
                        lines.append(handler.format(record) + handler.terminator)
                    except Exception:
                        handler.handleError(record)
            if not lines:
                continue
            handler.acquire()
            try:
                handler.stream.write("".join(lines))
                handler.flush()
            except Exception:
                handler.handleError(records[-1])
            finally:
                handler.release()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        super().close()


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, text, None, None)


def access_lines(logger: logging.Logger) -> Callable[[str], None] | None:
    """Where finished access-log lines go without a LogRecord: the batching handler's `line`, when it is the
    logger's only handler and nothing else (a level, a filter) would see the record; otherwise None (then
    log through `logger`, as tests that capture records do)."""
    if logger.filters or not logger.isEnabledFor(logging.INFO) or len(logger.handlers) != 1:
        return None
    handler = logger.handlers[0]
    return handler.line if isinstance(handler, _Batched) and not handler.filters else None


@contextlib.contextmanager
def logging_off_the_loop() -> Iterator[None]:
    """Route the root logger's handlers through `_Batched`, per worker (threads do not survive fork).

    Also turns off what logging gathers per record that our format never prints (the caller's file and
    line, thread and process names): a few µs per access-log line (logging docs, "Optimization").
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no stack walk to find the caller
    with contextlib.ExitStack() as stack:
        for logger in (logging.getLogger(), logging.getLogger(ACCESS_LOGGER)):
            stack.enter_context(_batched(logger))
        yield


@contextlib.contextmanager
def _batched(logger: logging.Logger) -> Iterator[None]:
    handlers = list(logger.handlers)
    if not handlers:
        yield
        return
    batched = _Batched(handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(batched)
    try:
        yield
    finally:
        logger.removeHandler(batched)
        batched.close()  # writes what is still waiting
        for handler in handlers:
            logger.addHandler(handler)


def configure_logging(secrets: tuple[str, ...] = ()) -> None:
    """stderr, INFO, one line per record, for `cachingproxy serve`; `secrets` (the admin token) are masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskSecrets(secrets))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("aiohttp.server").addFilter(OneLineBadRequests())
    # The access log: bare lines (JSON objects or combined), straight to stderr's descriptor (AtomicLines).
    access = logging.getLogger(ACCESS_LOGGER)
    lines = AtomicLines(sys.stderr.fileno())
    lines.addFilter(MaskSecrets(secrets))  # applied by _Batched before each write, as for the other handler
    access.addHandler(lines)
    access.propagate = False
    # botocore DEBUG is wire-level, credentials included (botocore#2626): never let it through.
    logging.getLogger("botocore").setLevel(logging.WARNING)
