"""The error a user can fix, and how every script reports it: one line, never a traceback (`run_cli`)."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class Galaxy10Error(Exception):
    """A problem the user can fix. Scripts print it as one line, without a traceback."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; turn user errors and Ctrl-C into one line and an exit code."""
    try:
        return main(argv) or 0
    except Galaxy10Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was kept from the unfinished step", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, like other shell tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
