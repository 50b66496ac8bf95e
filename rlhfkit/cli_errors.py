"""How every rlhfkit command line ends when something goes wrong: one line on stderr, exit code 2.

    from rlhfkit.cli_errors import ArgumentParser, run_cli
    def my_main(argv): parser = ArgumentParser(prog="rlhfkit serve"); ...; return 0
    sys.exit(run_cli(my_main, sys.argv[1:], prog="rlhfkit serve"))

`run_cli(command, argv, prog)` runs `command(argv)` (argv without `--debug`, which may stand anywhere) and turns
  * a UserError (a bad setting, argument, data file, model, checkpoint; rlhfkit.errors) into `PROG: error: ...`,
    one line, exit 2;
  * a failed write (no space left, a read-only file system, no permission; also one raised by a library that
    reports it in its own error type) into one such line naming the path and what to free or change, exit 2;
  * a closed output pipe (`rlhfkit ... | head`) into a quiet exit 0, without a BrokenPipeError traceback;
  * Ctrl-C into `PROG: interrupted`, exit 130.
With `--debug`, errors are raised with their traceback instead. `ArgumentParser` is argparse's, but a bad
argument raises UsageError (one line naming the argument and `PROG --help`, exit 2) instead of printing the usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from rlhfkit.errors import UsageError, UserError

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an argument error is a UsageError (one line via run_cli) and not usage text + exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded(text, int, 1, "an integer >= 1")


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return _bounded(text, float, 0, "a number >= 0")


def _bounded(text: str, kind: type, low: float, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run_cli(command: Callable[[list[str]], int], argv: list[str] | None = None, prog: str = "rlhfkit") -> int:
    """Run a command line (see the module docstring); returns its exit code."""
    from rlhfkit.utils.disk_errors import disk_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        try:
            code = command(argv)
        except SystemExit as e:  # argparse's --help: its text is flushed below, inside the handler
            if not isinstance(e.code, (int, type(None))):
                raise
            code = e.code or 0
        sys.stdout.flush()  # a pipe closed early shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        problem = disk_error(e, getattr(e, "filename", None) or os.getcwd()) if _is_write_error(e) else None
        if problem is None or debug:
            raise
        print(f"{prog}: error: {one_line(problem)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _is_write_error(error: BaseException) -> bool:
    """An OSError of a failed write, or a library's own error type carrying one (e.g. safetensors')."""
    from rlhfkit.utils.disk_errors import error_number

    return error_number(error) is not None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def fail(message: str) -> NoReturn:
    """Stop a command with a one-line error (exit 2 under run_cli)."""
    raise UsageError(message)
