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
    if not flags.FLAGS.is_parsed() or _logging_flag_given():
        return None
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file(program, workdir)
    logging.set_verbosity(logging.INFO)  # `run` set WARNING for the console; the file takes INFO
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


class UserError(ValueError):
    """An error in what the user gave (data, config, flags): its message says what and where, so
    commands print it as one line, without a traceback."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the `--config.` flag and what to set."""


def _logging_flag_given() -> bool:
    return any(name in flags.FLAGS and flags.FLAGS[name].present for name in _LOGGING_FLAGS)


def run(main) -> None:
    """`absl.app.run(main)` for every command of the package: a `UserError` (bad data, whose message
    names the file, row and field; a config value that cannot work) prints as one line
    `error: ...` and exits with status 1. Libraries' INFO lines (TFDS, Orbax) stay off the console
    unless a logging flag is given (`--verbosity=0`, `--logtostderr`); a command with a workdir
    sends them to its log file (`log_to_workdir`)."""
    from absl import app

    def main_with_one_line_errors(argv):
        if not _logging_flag_given():
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None

    app.run(main_with_one_line_errors)


def define_config_flag(name: str, default: str | None, help_text: str):
    """`config_flags.DEFINE_config_file(..., lock_config=True)`, whose `--config.a.b=v` overrides are
    applied as it is defined: a key that the config does not have exits with one line naming it and
    ml_collections' suggestion, not a traceback."""
    import sys

    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args else e
        text = (inner.args[0] if isinstance(inner, BaseException) and inner.args else str(inner)).strip("'\"")
        key, _, hint = text.partition("\n")
        given = [a for a in sys.argv[1:] if a.startswith(f"--{name}.")]
        raise SystemExit(f"error: the config has no key {key.strip(chr(39))!r}" + (f" ({hint})" if hint else "")
                         + f"; overrides given: {' '.join(given)}") from None
