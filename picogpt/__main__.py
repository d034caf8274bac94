"""`python -m picogpt` and the `picogpt` console script.

Nothing heavy is imported before the Ctrl-C handler is in place: a Ctrl-C while NumPy loads (the
first tenth of a second) exits 130 without a traceback, like one at any later moment."""

import sys


def main():
    try:
        from picogpt.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
