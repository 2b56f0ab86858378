"""Typed options for the commands: one frozen dataclass per command holds every option and its
default, defined once.

The command line fills one with `from_args`; Python callers (the demo, the report, the tests)
construct it directly and get every default, so an option added to a command cannot be missing
from another caller. `to_argv` renders options as the command line that would give them, for
logs and result pages. tests/test_options.py checks that each parser and its dataclass agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# argparse bookkeeping, not options
_NOT_OPTIONS = {"func", "command", "help"}


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """The options `cls` from parsed arguments; a parser missing a field fails here, not later."""
    values = vars(ns)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"the parser for {cls.__name__} has no option for {', '.join(missing)}")
    return cls(**{n: values[n] for n in names})


def command(cls: type[T], run: Callable[[T], int]) -> Callable[[argparse.Namespace], int]:
    """A parser's `func`: build the typed options, then run."""
    return lambda ns: run(from_args(cls, ns))


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    cls: type[T],
    run: Callable[[T], int],
    **parser_kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose parser fills `cls` and runs `run` with it."""
    p = sub.add_parser(name, **parser_kwargs)
    add_arguments(p)
    p.set_defaults(func=command(cls, run))
    return p


def option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in _NOT_OPTIONS and a.dest != argparse.SUPPRESS}


def to_argv(parser: argparse.ArgumentParser, options: Any) -> list[str]:
    """The arguments that make `parser` produce `options` (options left at their defaults omitted)."""
    argv: list[str] = []
    positional: list[str] = []
    for action in parser._actions:
        if action.dest in _NOT_OPTIONS or not hasattr(options, action.dest):
            continue
        value = getattr(options, action.dest)
        if not action.option_strings:
            positional += [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
            continue
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            argv.append(flag)
        else:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return positional + argv


def command_line(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None], options: Any) -> str:
    """`prog` followed by the arguments that give `options`, as a user would type it."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return " ".join([prog, shlex.join(to_argv(parser, options))]).rstrip()
