"""argparse types that check a flag's value before any work starts: bad input is one usage line
and exit code 2, never a traceback halfway through a run."""
import argparse
import os


def number(kind, accept, rule):
    """An argparse type: `kind` parsed from text, then held to `rule` (e.g. "> 0")."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def positive(kind):
    return number(kind, lambda v: v > 0, "> 0")


def nonnegative(kind):
    return number(kind, lambda v: v >= 0, ">= 0")


probability = number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def writable_dir(text):
    """An argparse type: a directory that exists and can be written to, checked before any work."""
    if not os.path.isdir(text) or not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a writable directory")
    return text
