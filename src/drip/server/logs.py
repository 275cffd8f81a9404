"""Structured JSON logs for ``drip serve``: one JSON object per line on stderr.

structlog renders Drip's own events and, through the standard library's logging, those
of uvicorn and every other library, so one parser reads them all. Requests are logged
by route template (``/v1/wallets/{user_id}``), never with headers, query strings or
bodies: keys, session tokens and webhook signatures stay out of the logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send every logger's records, as JSON lines, to ``stream`` (stderr by default)."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log prints raw paths with query strings; Drip logs requests itself
    logging.getLogger("uvicorn.access").disabled = True


def request_logger() -> Any:
    return structlog.get_logger("drip.http")
