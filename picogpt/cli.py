"""The picogpt command line (a stub until the CLI lands)."""

import argparse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="picogpt",
        description="GPT-2 in plain Python and NumPy: generate text from OpenAI's checkpoints.",
    )
    parser.add_argument("prompt", nargs="?", help="text to continue")
    return parser


def main(argv=None):
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0
