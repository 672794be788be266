"""Every numeric flag has a range: an out-of-range value, NaN or inf is refused before anything starts,
in one line naming the flag and the range, with argparse's exit status 2.

Seen before: `search.server --header_timeout_secs -1` was accepted and then closed every connection;
`pipelines.index --num_shards 3000` ran two minutes creating empty stores and fixed index.json at 3000.
"""

from __future__ import annotations

import argparse

import pytest

from pipelines.options import EmbedOptions, IndexOptions, LaunchOptions, ReembedOptions, SharedOptions, SinkOptions
from tests.test_cli import beam_options_parser, cli, flags_of

NUMERIC = ("int", "float", "_port")


def numeric_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for flag, action in flags_of(parser).items()
            if action.type in (int, float) or getattr(action.type, "__name__", "") in NUMERIC}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from evaluation.gate import build_parser as gate_parser
    from search.recall import build_parser as recall_parser
    from search.router import build_parser as router_parser
    from search.server import build_parser

    return {
        "search.recall": recall_parser(),
        "search.router": router_parser(),
        "evaluation.gate": gate_parser(),
        "pipelines.embed": beam_options_parser(SharedOptions, EmbedOptions, LaunchOptions),
        "pipelines.index": beam_options_parser(SharedOptions, IndexOptions, SinkOptions, LaunchOptions),
        "pipelines.reembed": beam_options_parser(SharedOptions, EmbedOptions, ReembedOptions, LaunchOptions),
        "search.server": build_parser(),
    }


def _refused(parse, text: str) -> bool:
    try:
        parse(text)
    except (argparse.ArgumentTypeError, ValueError):
        return True
    return False


@pytest.mark.parametrize("module", ["pipelines.embed", "pipelines.index", "pipelines.reembed", "search.server",
                                    "search.router", "search.recall", "evaluation.gate"])
def test_every_numeric_flag_is_bounded_and_takes_its_default(module):
    flags = numeric_flags(_parsers()[module])
    assert len(flags) >= 2, module
    unbounded = sorted(flag for flag, action in flags.items() if action.type in (int, float))
    assert not unbounded, f"{module}: numeric flags without a range: {unbounded}"
    for flag, action in flags.items():
        for text in ("nan", "inf", "-inf", "1e12", "-1e12", "1000000000000"):
            assert _refused(action.type, text), f"{module} {flag} accepts {text}"
        if action.default is not None:
            assert not _refused(action.type, str(action.default)), f"{module} {flag} refuses its default"


@pytest.mark.parametrize("module, argv, message", [
    ("search.server", ["--index_dir", "/nonexistent/index", "--header_timeout_secs", "-1"],
     "argument --header_timeout_secs: must be a number in 0.5..300 (seconds), got '-1'"),
    ("search.server", ["--index_dir", "/nonexistent/index", "--image_timeout_secs", "nan"],
     "argument --image_timeout_secs: must be a number in 0.1..300 (seconds), got 'nan'"),
    ("search.server", ["--index_dir", "/nonexistent/index", "--image_query_slots", "0"],
     "argument --image_query_slots: must be an integer in 1..1024, got '0'"),
    ("pipelines.index", ["--input_dir", "/nonexistent/records", "--index_dir", "INDEX", "--num_shards", "3000"],
     "argument --num_shards: must be an integer in 1..1024, got '3000'"),
    ("pipelines.index", ["--input_dir", "/nonexistent/records", "--index_dir", "INDEX",
                         "--commit_max_delay_secs", "inf"],
     "argument --commit_max_delay_secs: must be a number in 0.01..300 (seconds), got 'inf'"),
    ("pipelines.index", ["--input_dir", "/nonexistent/records", "--sink", "qdrant", "--collection", "c",
                         "--qdrant_path", "INDEX", "--qdrant_retries", "11"],
     "argument --qdrant_retries: must be an integer in 0..10, got '11'"),
    ("pipelines.embed", ["--input_file", "/nonexistent/*.jsonl", "--output_dir", "INDEX", "--image_weight", "nan"],
     "argument --image_weight: must be a number strictly between 0 and 1, got 'nan'"),
    ("pipelines.embed", ["--input_file", "/nonexistent/*.jsonl", "--output_dir", "INDEX",
                         "--max_concurrent_downloads", "100000"],
     "argument --max_concurrent_downloads: must be an integer in 1..1024, got '100000'"),
    ("pipelines.reembed", ["--source_dir", "/nonexistent/state", "--output_dir", "INDEX",
                           "--download_retries", "-1"],
     "argument --download_retries: must be an integer in 0..10, got '-1'"),
])
def test_an_out_of_range_value_is_refused_in_one_line_with_status_2(module, argv, message, tmp_path):
    out = tmp_path / "out"
    result = cli(module, *[str(out) if a == "INDEX" else a for a in argv], timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    # argparse's one-line usage, then the line naming the flag and its range; nothing was started.
    assert len(lines) == 2 and lines[0].startswith("usage: "), result.stderr[-2000:]
    assert lines[1] == f"python -m {module}: error: {message}"
    assert not out.exists()
