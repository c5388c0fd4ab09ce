"""A user's mistake ends the run with one line and a non-zero exit, never a traceback."""

import functools
import os
import sys


class UsageError(Exception):
    """Something the user passed is wrong; the message says what and what to do."""

    exit_code = 2


class RunError(UsageError):
    """The run could not go on (a non-finite loss, a failed push); results so far are kept."""

    exit_code = 1


def main_guard(main):
    """Wrap a script's main: UsageError -> 'error: ...' on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            if os.environ.get("RANK", "0") == "0":  # every process hits it; one says so
                print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)

    return wrapper
