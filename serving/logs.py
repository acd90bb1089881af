"""One log line per event, as text for people or JSON (LOG_FORMAT=json) for log collectors."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            # Milliseconds and the offset: lines of several hosts and tiers are put in order by this.
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": f"{record.name}[{record.process}]",
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = "".join(f" {key}={value}" for key, value in fields.items())
        return super().format(record) + extra


def setup(name: str, settings: Settings) -> None:
    """Log this process to stderr at LOG_LEVEL in LOG_FORMAT; `name` tags its lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else _TextFormatter())
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.getLogger(name).debug("logging as %s", settings.log_format)


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event with named fields (request_id=..., status=...) kept as fields in JSON."""
    logger.log(level, message, extra={"fields": fields})
