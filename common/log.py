"""Structured logging: structlog rendering JSON lines, one event per line.

Every decision the proxy takes is one event with named fields; the event
name says what happened (``connection_opened``, ``connection_closed``,
``backend_connect_failed`` ...).
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream: TextIO | None = None, **context) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
    if context:
        structlog.contextvars.bind_contextvars(**context)


def get(name: str = "mmproxy"):
    return structlog.get_logger(name)
