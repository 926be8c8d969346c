"""Log lines a relay writes about what strangers send it: bounded, and free of secrets.

Whoever can reach a relay decides how often these lines are written, so each is
rate-limited (one line per interval, with a count). aiohttp logs a request it cannot
parse with the parser's exception, whose text quotes the raw header line: a header
holding a NUL quotes the ``Authorization`` header, token included. Those records are
rewritten to name the error's class only.
"""

from __future__ import annotations

import logging
import time

from aiohttp.http_exceptions import HttpProcessingError

#: Seconds between two lines of one rate-limited message.
LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """``hit()`` counts an occurrence; a warning with the count since the last line is
    written at most once per ``interval`` (the first occurrence at once)."""

    def __init__(self, logger: logging.Logger, message: str, *,
                 interval: float = LOG_INTERVAL_S) -> None:
        self.logger = logger
        self.message = message
        self.interval = interval
        self.count = 0
        self.total = 0
        self._last = -float("inf")

    def hit(self) -> None:
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.logger.warning(self.message, self.count,
                                extra={"event": "rate_limited_log", "count": self.count})
            self.count = 0


class _RedactHttpErrors(logging.Filter):
    """On ``aiohttp.server``: a record of a request that did not parse (an
    ``HttpProcessingError``) becomes one line naming the error's class, at most one such
    line per interval. Other records (a bug of ours: a traceback worth having) pass."""

    warmpool_redact = True

    def __init__(self) -> None:
        super().__init__()
        self._last = -float("inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < LOG_INTERVAL_S:
            self._dropped += 1
            return False
        self._last = now
        name = type(exc).__name__
        record.msg = "refused a request that is not valid HTTP (%s); %d more since the last line"
        record.args = (name, self._dropped)
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.WARNING
        record.levelname = "WARNING"
        self._dropped = 0
        return True


def quiet_aiohttp_errors() -> None:
    """Install the redacting filter on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(getattr(f, "warmpool_redact", False) for f in logger.filters):
        logger.addFilter(_RedactHttpErrors())
