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


def get_logger(name: str = "shardkv", **context):
    """A structlog logger writing through the stdlib logger `name`, bound to `context`."""
    return structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    ).bind(**context)
