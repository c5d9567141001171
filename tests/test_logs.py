"""Logging: text and JSON lines, extras, tracebacks, journald priorities, reconfigure on SIGHUP."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import threading

import pytest

from kvtierd import logs


@pytest.fixture
def out():
    buf = io.StringIO()
    yield buf
    logs.shutdown()


def lines(buf: io.StringIO) -> list[str]:
    assert logs.flush()
    return buf.getvalue().splitlines()


def test_json_lines_carry_core_fields_and_extras(out):
    logs.setup("info", "json", stream=out)
    log = logging.getLogger("kvtierd.store")
    log.info("demoted %d blocks", 12, extra={"tier": "host", "key": b"\x01\xff", "took_s": 0.5})
    log.debug("not shown at info")
    (line,) = lines(out)
    obj = json.loads(line)
    assert obj["level"] == "info" and obj["logger"] == "kvtierd.store" and obj["msg"] == "demoted 12 blocks"
    assert obj["tier"] == "host" and obj["key"] == "01ff" and obj["took_s"] == 0.5
    assert obj["ts"].endswith("Z") and obj["ts"][10] == "T"


def test_json_exception_is_one_line_with_the_traceback_in_exc(out):
    logs.setup("info", "json", stream=out)
    try:
        raise ValueError("bad segment header")
    except ValueError:
        logging.getLogger("kvtierd.disk").exception("recovery skipped a record")
    (line,) = lines(out)
    obj = json.loads(line)
    assert obj["msg"] == "recovery skipped a record"
    assert "ValueError: bad segment header" in obj["exc"] and "Traceback" in obj["exc"]


def test_text_lines_have_timestamp_level_logger_and_key_values(out):
    logs.setup("debug", "text", stream=out)
    logging.getLogger("kvtierd.server").debug("client connected", extra={"uid": 1000, "comm": "python -m vllm"})
    (line,) = lines(out)
    ts, rest = line.split(" ", 1)
    assert ts.endswith("Z")
    assert rest == 'DEBUG kvtierd.server: client connected uid=1000 comm="python -m vllm"'


def test_message_is_rendered_when_logged_not_when_written(out):
    logs.setup("info", "text", stream=out)
    args = ["before"]
    logging.getLogger("t").info("value %s", args)
    args[0] = "after"
    assert lines(out)[0].endswith("value ['before']")


def test_reconfigure_changes_level_and_format_without_losing_records(out):
    logs.setup("warning", "text", stream=out)
    log = logging.getLogger("kvtierd.x")
    log.info("dropped at warning")
    log.warning("as text")
    assert logs.reconfigure("debug", "json") is True
    log.debug("as json")
    assert logs.reconfigure("debug", "json") is False
    got = lines(out)
    assert len(got) == 2
    assert got[0].endswith("WARNING kvtierd.x: as text")
    assert json.loads(got[1])["msg"] == "as json"
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logging.handlers.QueueHandler)]
    assert len(ours) == 1                          # changed in place, not a second handler


def test_setup_twice_does_not_duplicate_lines(out):
    logs.setup("info", "text", stream=out)
    logs.setup("info", "text", stream=out)
    logging.getLogger("t").info("once")
    assert len(lines(out)) == 1


def test_bad_level_or_format_is_a_clear_error(out):
    with pytest.raises(ValueError, match="log.level must be one of"):
        logs.setup("loud", "text", stream=out)
    with pytest.raises(ValueError, match="log.format must be one of"):
        logs.setup("info", "xml", stream=out)


def test_records_are_written_by_a_thread_not_the_caller(out):
    writers = []

    class Spy(io.StringIO):
        def write(self, s):
            writers.append(threading.get_ident())
            return super().write(s)

    spy = Spy()
    logs.setup("info", "text", stream=spy)
    logging.getLogger("t").info("hello")
    assert logs.flush()
    assert writers and threading.get_ident() not in writers


def test_under_journald_lines_carry_syslog_priorities_instead_of_timestamps(tmp_path, monkeypatch):
    path = tmp_path / "journal"
    with open(path, "w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup("info", "text", stream=f)
        try:
            raise KeyError("k")
        except KeyError:
            logging.getLogger("kvtierd.disk").exception("checksum mismatch")
        logging.getLogger("kvtierd.disk").warning("falling back to buffered I/O")
        assert logs.flush()
        logs.shutdown()
    got = path.read_text().splitlines()
    assert got[0] == "<3>ERROR kvtierd.disk: checksum mismatch"
    assert all(ln.startswith("<3>") for ln in got[1:-1])        # traceback lines keep the error priority
    assert got[-1] == "<4>WARNING kvtierd.disk: falling back to buffered I/O"
