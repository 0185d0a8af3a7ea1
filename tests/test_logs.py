"""Log lines a person and a log shipper can read: ISO 8601 UTC times, no terminal colour
codes, and in local mode's console lines what each request did."""

import json
import logging
import re

import pytest

from app.logs import configure_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_carry_utc_iso_times_and_no_ansi(capsys, restore_logging):
    configure_logging(level="INFO", fmt="json")
    logging.getLogger("uvicorn.error").info("Started", extra={"color_message": "\x1b[32mgo\x1b[0m"})
    line = json.loads(capsys.readouterr().err.strip())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    assert "color_message" not in line and "\x1b" not in json.dumps(line)


def test_console_lines_say_what_each_request_did(capsys, restore_logging):
    configure_logging(level="INFO", fmt="console")
    logging.getLogger("coldmail.webhooks").info(
        "delivery",
        extra={
            "eventId": "E1",
            "event": "mailbox.created",
            "outcome": "processed",
            "latency_ms": 4.1,
        },
    )
    logging.getLogger("coldmail.access").info(
        "request", extra={"method": "POST", "path": "/webhooks/cmr", "status": 200, "latency_ms": 5}
    )
    delivery, access = capsys.readouterr().err.strip().splitlines()
    assert delivery.endswith(
        "delivery latency_ms=4.1 event=mailbox.created eventId=E1 outcome=processed"
    )
    assert "method=POST path=/webhooks/cmr status=200" in access
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 INFO ", access)
