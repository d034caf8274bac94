"""`python -m picogpt` and the `picogpt` console script.

A Ctrl-C in the first tenth of a second, while NumPy loads, must exit 130 without a traceback like
one at any later moment. NumPy turns an interrupt inside its import into an ImportError, so the
heavy imports run here, first, with Ctrl-C held back until they are done."""

import signal
import sys


def main():
    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        import numpy  # noqa: F401  (what every command but --help needs, imported in peace)

        from picogpt.cli import main as cli_main
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        if interrupted:
            raise KeyboardInterrupt
        return cli_main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
