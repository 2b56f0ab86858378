"""Each command's parser and its typed options agree: the same fields, the same defaults, and a
command line rendered from options parses back to them. A caller that builds the options in
Python therefore gets exactly what the command line would give."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from actsparse import benchmark, convert, demo, evaluate, report
from actsparse.options import from_args, option_dests, to_argv

COMMANDS = {
    "convert": (convert.add_arguments, convert.ConvertOptions, ["m.gguf"], {"model": Path("m.gguf")}),
    "eval": (evaluate.add_arguments, evaluate.EvalOptions, ["a.gguf", "b.gguf"],
             {"models": [Path("a.gguf"), Path("b.gguf")]}),
    "bench": (benchmark.add_arguments, benchmark.BenchOptions, ["m.gguf"], {"model": Path("m.gguf")}),
    "report": (report.add_arguments, report.ReportOptions, [], {}),
    "demo": (demo.add_arguments, demo.DemoOptions, [], {}),
}  # fmt: skip

# a value unlike each field's default, by the default's type
CHANGED = {
    "convert": {"output": Path("o.gguf"), "sparsity": "0.4,0.6", "default_level": 0.6, "method": "cats",
                "attn": False, "calib_tokens": 1000, "refine_tokens": 0, "quiet": True, "threads": 3},
    "eval": {"levels": "0.5", "tasks": "none", "limit": 7, "chunks": 0, "dense_only": True,
             "png": Path("q.png")},
    "bench": {"levels": "0.5,0.7", "repeats": 2, "n_prompt": 0, "quiet": True, "json": Path("b.json")},
    "report": {"models": "smollm2-135m", "calib_tokens": 2048, "reuse_quality": True, "output": Path("r.md")},
    "demo": {"model": "smollm2-135m", "prompt": "Once upon a time", "n_predict": 16, "levels": "0.5",
             "output": Path("d.gguf"), "repeats": 1},
}  # fmt: skip


def _parser(add_arguments) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


@pytest.mark.parametrize("name", COMMANDS)
def test_parser_and_options_have_the_same_fields_and_defaults(name: str) -> None:
    add_arguments, cls, argv, required = COMMANDS[name]
    parser = _parser(add_arguments)
    assert option_dests(parser) == {f.name for f in dataclasses.fields(cls)}
    assert from_args(cls, parser.parse_args(argv)) == cls(**required)


@pytest.mark.parametrize("name", COMMANDS)
def test_rendered_command_line_parses_back_to_the_options(name: str) -> None:
    add_arguments, cls, _, required = COMMANDS[name]
    parser = _parser(add_arguments)
    for options in (cls(**required), cls(**required, **CHANGED[name])):
        assert from_args(cls, parser.parse_args(to_argv(parser, options))) == options


def test_a_parser_missing_an_option_fails_at_once() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    with pytest.raises(TypeError, match="no option for"):
        from_args(benchmark.BenchOptions, parser.parse_args(["m.gguf"]))


def test_the_cli_runs_every_command_through_its_options() -> None:
    from actsparse.cli import build_parser

    parser = build_parser()
    for name, (_, cls, argv, required) in COMMANDS.items():
        ns = parser.parse_args([name, *argv])
        assert from_args(cls, ns) == cls(**required)
