"""Logs as JSON lines (``BNFOLD_LOG_FORMAT=json``), for cluster log collectors (Fluent Bit, Vector, Loki...).

One object per line on stderr: ``time`` (UTC, RFC 3339 with milliseconds), ``level`` (lower case), ``logger``,
``message``, and ``exception`` (the formatted traceback) when there is one. The same configuration goes to
uvicorn as its ``log_config``, so its own loggers and every worker process write the same format.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON; never raises on odd arguments (they are formatted as ``%`` would)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_log_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dictionary: everything (uvicorn's loggers too) to one JSON stderr handler."""
    name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "bnfold": {"level": name},
            "uvicorn": {"handlers": [], "level": name, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": name, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": name, "propagate": True},
        },
    }


def json_from_the_start() -> None:
    """JSON lines already for what is logged before the settings are read (``BNFOLD_LOG_FORMAT`` as set)."""
    if os.environ.get("BNFOLD_LOG_FORMAT", "").strip().lower() == "json":
        level = os.environ.get("BNFOLD_LOG_LEVEL", "").strip().lower()
        logging.config.dictConfig(json_log_config(level if level in ("debug", "info", "warning", "error") else "info"))
