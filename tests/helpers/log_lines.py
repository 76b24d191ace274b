"""`log_lines(name)`: the messages the package logs while inside, for tests that check what the user
is told. It attaches its own handler to the logger (and lets INFO through), so it sees the records
whether or not an in-process entry point already installed the console (logs.configure, which stops
propagation to the root logger, where pytest's caplog listens)."""

import logging
from contextlib import contextmanager


@contextmanager
def log_lines(name: str = "megatron.remoe"):
    lines: list = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
