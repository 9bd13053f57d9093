"""What the console shows: mmjax's own lines (progress, evaluations, tables) and warnings; the INFO
chatter of Orbax, TFDS and absl goes to a log file in the workdir."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os

from absl import flags, logging

_LOGGING_FLAGS = ("verbosity", "v", "logtostderr", "alsologtostderr", "stderrthreshold", "log_dir")


def log_to_workdir(workdir: str, program: str = "mmjax") -> str | None:
    """Sends absl logging (INFO and up) to `workdir/<program>.INFO` (a link to the newest log file) and
    leaves warnings and errors on the console too. Does nothing when a logging flag was given on the
    command line (`--verbosity=0`, `--logtostderr`, ...): the console then shows what absl normally
    does. Returns the log's path, or None."""
    if not flags.FLAGS.is_parsed() or any(
            name in flags.FLAGS and flags.FLAGS[name].present for name in _LOGGING_FLAGS):
        return None
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file(program, workdir)
    flags.FLAGS.stderrthreshold = "warning"
    return os.path.join(workdir, f"{program}.INFO")


@contextlib.contextmanager
def quiet_absl(level: int = std_logging.ERROR):
    """Drops absl log records below `level` (console and log file) inside the block: for the notes a
    library prints about what was asked of it (Orbax opening a read-only manager, TFDS using a
    custom builder config)."""
    logger = std_logging.getLogger("absl")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
