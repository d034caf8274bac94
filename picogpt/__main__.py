"""`python -m picogpt` and the `picogpt` console script.

A Ctrl-C at any moment after this module starts must exit 130 with one line, "interrupted", never
a traceback. NumPy turns an interrupt inside its import into an ImportError, and the imports take
tenths of a second, so the first thing this module does is hold Ctrl-C back (a handler that only
notes it) until the command line is imported. Before this module, Python starts and runs
`picogpt/__init__.py`, which imports nothing: that window, a few milliseconds, is Python's."""

import _signal  # built in, already loaded: `signal` would first import enum, unguarded
import sys

_interrupts = []


def _note(signum, frame):
    _interrupts.append(signum)


def _hold():
    """Note Ctrl-C instead of raising it; what was there before, to restore (None: signals are
    not ours to handle, outside the main thread)."""
    try:
        previous = _signal.signal(_signal.SIGINT, _note)
    except ValueError:
        return None
    return _signal.default_int_handler if previous is None else previous  # None: set in C


_previous = _hold()  # first thing: from here on a Ctrl-C is noted until main() can raise it


def main():
    global _previous
    try:
        try:
            if _previous is None:  # a second call
                _previous = _hold()
            import numpy  # noqa: F401  (what every command but --help needs, imported in peace)

            from picogpt.cli import main as cli_main
        finally:
            if _previous is not None:
                _signal.signal(_signal.SIGINT, _previous)
                _previous = None
        if _interrupts:
            _interrupts.clear()
            raise KeyboardInterrupt
        return cli_main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
