"""The logger aiohttp servers get: a malformed request is one debug line, not a traceback.

aiohttp logs a request it cannot parse (a 200 KB request line, a bad header) at ERROR with the
parser's traceback. For a status port or a dev server that is noise a client controls (and could
use to flood the log), so such records lose their traceback and become one DEBUG line; the client
got its HTTP error. Other errors keep their level and traceback.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

LOGGER = "relay.http"


class _MalformedRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = record.getMessage()
            record.msg, record.args = "%s: %s", (what, f"{error.code} {error.message.splitlines()[0][:120]}")
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG)
        return True


def http_server_logger() -> logging.Logger:
    """`relay.http`: the logger to hand to aiohttp's AppRunner(logger=...)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, _MalformedRequests) for f in logger.filters):
        logger.addFilter(_MalformedRequests())
    return logger
