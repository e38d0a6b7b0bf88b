"""`mesh node start` and `mesh entry start` alike: settings, logging, then the daemon's trio
loop, with start-up failures turned into one clear line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from runtime.logs import setup_logging


def run_daemon(load_config: Callable[[], Any], make_daemon: Callable[[Any], Any], errors: tuple[type[BaseException], ...],
               logger: str) -> int:
    """load_config() -> settings (ValueError: bad settings); make_daemon(settings).run() is
    the daemon's async main; `errors` are the failures to report as one line."""
    import trio

    from runtime.errors import CliError

    try:
        cfg = load_config()
    except ValueError as e:
        raise CliError(str(e)) from None
    setup_logging(cfg.log_format, cfg.log_level)
    try:
        status: int = trio.run(make_daemon(cfg).run)
        return status
    except errors as e:
        logging.getLogger(logger).debug("start failed", exc_info=True)
        raise CliError(str(e)) from None
