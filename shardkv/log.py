"""Structured logging for shardkv (structlog on top of the standard `logging` module).

A library must not print by itself: events go to the stdlib logger "shardkv", so an application
sees them only if it configures logging (warnings reach stderr through logging's last-resort
handler). The service (`shardkv start`) configures handlers of its own.
"""

from __future__ import annotations

import logging

import structlog

_PROCESSORS = [
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
]


def configure_service_logging(log_dir: str, role: str) -> str:
    """Send this process's shardkv events, as JSON lines, to `log_dir`/`role`.log (services only)."""
    import os  # noqa: PLC0415

    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    path = os.path.join(log_dir, f"{role}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("shardkv")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    _PROCESSORS[-1] = structlog.processors.JSONRenderer(sort_keys=True)
    return path


def get_logger(name: str = "shardkv", **context):
    """A structlog logger writing through the stdlib logger `name`, bound to `context`."""
    return structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    ).bind(**context)
