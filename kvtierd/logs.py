"""Logging setup: text or JSON lines on stderr, written by a thread, changeable on SIGHUP.

* text: `2026-11-22T10:00:00.123Z INFO kvtierd.store: message key=value ...`.
  Under systemd (JOURNAL_STREAM names our stderr) the timestamp is dropped,
  journald adds its own, and each line starts with a `<N>` syslog priority so
  `journalctl -p warning` works.
* json: one object per line: ts, level, logger, msg, then every `extra=` field
  of the call, then `exc` with the traceback when there is one. Bytes are hex.

The event loop never writes to stderr itself: records go through a
QueueHandler to a QueueListener thread that formats and writes them, so a
slow journald or a full pipe cannot stall requests. The message is rendered
(`msg % args`) on the calling thread, so later changes to the args do not
change what is logged.

`reconfigure()` changes the level and format in place, without replacing the
handler: no record is lost or duplicated across a SIGHUP.

Client-chosen text (namespace names, client names) can hold terminal control
sequences; `printable()` escapes them for anything an operator reads (the
`kvtierd stats` CLI, log lines). Text log lines escape control characters in
the message and in extras, JSON lines escape DEL and C1 (JSON already escapes
C0), so a name cannot move an operator's cursor or forge a log line.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import IO, Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_FLUSH_ATTR = "_kvtierd_flush"


# C0, DEL and C1 -> \xNN. A message is one line; tracebacks travel apart (exc_text).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_JSON_C1 = {c: f"\\u{c:04x}" for c in range(0x7f, 0xa0)}


def printable(text: Any) -> str:
    """`text` with every control character (C0, DEL, C1) written as \\xNN: safe on a terminal or a log line."""
    text = str(text)
    return text if text.isprintable() else text.translate(_CONTROL)


def json_safe(text: str) -> str:
    """A JSON document with DEL and C1 characters escaped as \\u00NN (json.dumps leaves them raw)."""
    return text.translate(_JSON_C1)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; core fields win over same-named extras."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = dict(_extras(record))
        obj.update(ts=_iso(record.created), level=record.levelname.lower(), logger=record.name,
                   msg=record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = record.stack_info
        return json_safe(json.dumps(obj, default=_jsonable, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger: msg k=v ...`; with `journal=True` a `<N>` priority prefix instead of a timestamp."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage().translate(_CONTROL)}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        if self.journal:
            prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
            # Each physical line gets the prefix, or journald logs traceback lines at the default level.
            return "\n".join(f"<{prio}>{part}" for part in line.split("\n"))
        return f"{_iso(record.created)} {line}"


def _text_value(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    s = str(v)
    # json.dumps escapes C0 and (ensure_ascii) everything past ASCII; DEL is escaped by hand.
    return json_safe(json.dumps(s)) if (not s or any(c in s for c in " \"=\n") or s != printable(s)) \
        else s


class _RenderingQueueHandler(logging.handlers.QueueHandler):
    """Renders msg % args and the traceback on the caller's thread, keeps extras for the formatter."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        r = copy.copy(record)
        r.msg = record.getMessage()
        r.args = None
        if record.exc_info:
            r.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            r.exc_info = None
        return r


class _FlushHandler(logging.Handler):
    """Sets the Event carried by a flush marker record, after the records queued before it."""

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, _FLUSH_ATTR, None)
        if event is not None:
            event.set()


def _not_marker(record: logging.LogRecord) -> bool:
    return not hasattr(record, _FLUSH_ATTR)


def _under_journald(stream: IO[str]) -> bool:
    """True when `stream` is the journald stream systemd gave us (JOURNAL_STREAM=dev:inode)."""
    spec = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = spec.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(spec) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (ValueError, OSError, AttributeError):
        return False


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue_handler: _RenderingQueueHandler | None = None
        self.stream_handler: logging.StreamHandler | None = None
        self.listener: logging.handlers.QueueListener | None = None
        self.journal = False
        self.prior_level: int | None = None     # root level before setup(), restored by shutdown()


_state = _State()


def _formatter(fmt: str, journal: bool) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter(journal=journal)
    raise ValueError(f"log.format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"log.level must be one of {', '.join(LEVELS)}; got {level!r}") from None


def setup(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Install the kvtierd log pipeline on the root logger (replacing a previous setup())."""
    lvl, stream = _level(level), stream if stream is not None else sys.stderr
    with _state.lock:
        _shutdown_locked()
        _state.prior_level = logging.getLogger().level
        _state.journal = _under_journald(stream)
        out = logging.StreamHandler(stream)
        out.setFormatter(_formatter(fmt, _state.journal))
        out.addFilter(_not_marker)
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        qh = _RenderingQueueHandler(q)
        listener = logging.handlers.QueueListener(q, out, _FlushHandler())
        root = logging.getLogger()
        root.addHandler(qh)
        root.setLevel(lvl)
        listener.start()
        _state.queue_handler, _state.stream_handler, _state.listener = qh, out, listener


def reconfigure(level: str, fmt: str) -> bool:
    """Change level and format in place (SIGHUP); True when anything changed. setup() must have run."""
    lvl = _level(level)
    with _state.lock:
        if _state.stream_handler is None:
            raise RuntimeError("logs.setup() has not been called")
        new = _formatter(fmt, _state.journal)
        root = logging.getLogger()
        old = _state.stream_handler.formatter
        changed = root.level != lvl or type(old) is not type(new)
        root.setLevel(lvl)
        if type(old) is not type(new):
            flush()                 # records logged before the change keep the old format
            _state.stream_handler.setFormatter(new)
    return changed


def flush(timeout: float = 2.0) -> bool:
    """Wait until every record logged before this call is written; False on timeout."""
    qh = _state.queue_handler
    if qh is None:
        return True
    event = threading.Event()
    marker = logging.LogRecord("kvtierd.logs", logging.CRITICAL, "", 0, "", None, None)
    setattr(marker, _FLUSH_ATTR, event)
    qh.enqueue(marker)
    return event.wait(timeout)


def _shutdown_locked() -> None:
    if _state.listener is not None:
        _state.listener.stop()          # drains the queue first
        _state.listener = None
    if _state.queue_handler is not None:
        logging.getLogger().removeHandler(_state.queue_handler)
        _state.queue_handler = None
    if _state.stream_handler is not None:
        _state.stream_handler.flush()
        _state.stream_handler = None
    if _state.prior_level is not None:
        logging.getLogger().setLevel(_state.prior_level)
        _state.prior_level = None


def shutdown() -> None:
    """Write what is queued and remove the handlers (at exit; safe to call twice)."""
    with _state.lock:
        _shutdown_locked()


atexit.register(shutdown)
