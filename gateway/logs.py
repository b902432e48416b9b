"""structlog set-up: JSON lines when stdout is not a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, debug: bool = False, json_lines: bool | None = None) -> None:
    if json_lines is None:
        # JSON lines for machines (journald, a pipe, a file), readable lines for a person at a terminal.
        # Lines go to stderr so that command output on stdout (`status --json`) stays parseable.
        json_lines = not sys.stdout.isatty()
    level = logging.DEBUG if debug else logging.INFO
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: warnings and worse only (gateway/broker.py tunes amqtt's own).
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)


class _ToStructlog(logging.Handler):
    """Library records (amqtt, paho, aiosqlite) through the same renderer, so a JSON log stays all JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), logger=record.name)
        except Exception:
            self.handleError(record)
