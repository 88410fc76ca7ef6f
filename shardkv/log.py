"""Structured logging for shardkv (structlog on top of the standard `logging` module).

A library must not print by itself: events go to the stdlib logger "shardkv" as key=value
lines, so an application sees them only if it configures logging (warnings reach stderr
through logging's last-resort handler). The processes of a cluster call
`configure_service_logging`: then events are JSON lines in DIR/logs/<role>.log and, in the
foreground on a terminal, human-readable lines on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import structlog

_json = structlog.processors.JSONRenderer(sort_keys=True)
_key_value = structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)
_service = False  # set by configure_service_logging: render JSON lines


def _render(logger, method_name, event_dict):
    """The last processor: JSON lines in a service, key=value lines elsewhere (chosen per event,
    so loggers made before configuration render right too)."""
    return (_json if _service else _key_value)(logger, method_name, event_dict)


class _ReadableFormatter(logging.Formatter):
    """Shows a JSON-line event as 'time level event key=value ...' on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            event = json.loads(record.getMessage())
        except ValueError:
            return record.getMessage()
        head = f"{event.pop('timestamp', '')[11:23]} {event.pop('level', record.levelname.lower()):<7} {event.pop('event', '')}"
        return " ".join([head] + [f"{key}={value}" for key, value in sorted(event.items())])


def configure_service_logging(log_dir: str, role: str, terminal: bool = False) -> str:
    """Send this process's shardkv events to `log_dir`/`role`.log as JSON lines (and, with
    `terminal` and a terminal on stderr, to stderr as readable lines). Returns the file's path."""
    global _service
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    path = os.path.join(log_dir, f"{role}.log")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # owner-only, like every file of a store
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(message)s"))
    handlers: list[logging.Handler] = [to_file]
    if terminal and sys.stderr.isatty():
        to_terminal = logging.StreamHandler(sys.stderr)
        to_terminal.setFormatter(_ReadableFormatter())
        handlers.append(to_terminal)
    root = logging.getLogger("shardkv")
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    root.propagate = False
    _service = True
    return path


def get_logger(name: str = "shardkv", **context):
    """A structlog logger writing through the stdlib logger `name`, bound to `context`."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso"), _render],
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind(**context)
