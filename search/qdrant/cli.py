"""The flags that reach a Qdrant engine, shared by every command that does (search.server, search.aliases,
evaluation.gate; pipelines.index has its own in pipelines.options, as Beam options)."""

from __future__ import annotations

import argparse
import functools
from typing import Callable

from argtypes import bounded, matching
from search.qdrant.collection import API_KEY_ENV, SECRET_PATTERN, QdrantTarget, url_problem

__all__ = ["add_flags", "chosen", "refusal", "root_or_engine_refusal", "targets"]


def add_flags(parser: argparse.ArgumentParser, title: str) -> None:
    group = parser.add_argument_group(title)
    group.add_argument("--qdrant_url", help="The Qdrant server, e.g. https://xyz.gcp.cloud.qdrant.io:6333; the API key "
                                            f"from --qdrant_api_key_secret or ${API_KEY_ENV}.")
    group.add_argument("--qdrant_path", help="A local-mode directory (qdrant-client's embedded engine; one process at a "
                                             "time opens it).")
    group.add_argument("--qdrant_api_key_secret", type=matching(SECRET_PATTERN, "a Secret Manager secret"),
                       help="projects/P/secrets/S[/versions/V] holding the API key (never a flag's value).")
    group.add_argument("--qdrant_timeout_secs", type=bounded(int, 1, 300, "seconds"), default=10,
                       help="Each request to the Qdrant server.")


def refusal(args: argparse.Namespace) -> str | None:
    """Why the flags do not name one engine, or None."""
    if bool(args.qdrant_url) == bool(args.qdrant_path):
        return "give exactly one of --qdrant_url and --qdrant_path"
    if args.qdrant_url and (problem := url_problem(args.qdrant_url)):
        return f"--qdrant_url {problem}"
    if args.qdrant_path and args.qdrant_api_key_secret:
        return "--qdrant_api_key_secret is for --qdrant_url (the local mode has no key)"
    return None


def chosen(args: argparse.Namespace) -> bool:
    """Whether the flags name a Qdrant engine."""
    return bool(args.qdrant_url or args.qdrant_path or args.qdrant_api_key_secret)


def root_or_engine_refusal(args: argparse.Namespace) -> str | None:
    """For the commands that take named FAISS indexes (`--root`) or a Qdrant engine's collections
    (search.aliases, evaluation.gate): why the flags do not name exactly one, or None."""
    if chosen(args):
        return refusal(args) or ("--root is for named FAISS indexes, not with --qdrant_*" if args.root else None)
    return None if args.root else "give --root (named FAISS indexes) or --qdrant_url / --qdrant_path (Qdrant collections)"


def targets(args: argparse.Namespace) -> Callable[..., QdrantTarget]:
    """collection → the QdrantTarget of that collection on the engine the flags name."""
    return functools.partial(QdrantTarget, url=args.qdrant_url or "", path=args.qdrant_path or "",
                             api_key_secret=args.qdrant_api_key_secret or "", timeout_s=args.qdrant_timeout_secs)
