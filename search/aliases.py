"""Named indexes under one root, and the aliases that say which one serves (as Qdrant, Milvus and
Elasticsearch name them).

    python -m search.aliases --root ROOT                  # the indexes, their models and sizes, the aliases
    python -m search.aliases --root ROOT --set live=v2    # switch an alias (refused if v2 is no index)
    python -m search.aliases --root ROOT --show live      # the index it names (exit 1: none)
    python -m search.aliases --qdrant_url URL --set live=v2   # a Qdrant collection alias (or --qdrant_path DIR)

ROOT/NAME/ is an index (pipelines.index --index_dir ROOT/NAME); ROOT/aliases.json is
`{"aliases": {"live": "v2"}, "history": [...]}`, replaced whole and atomically (storage.replace_if:
a rename over the old file locally, a generation precondition on Cloud Storage), so a reader sees
the old alias or the new one, and of two switches at once exactly one wins (the other is told).
`search.server --index_dir ROOT --alias live` follows it. With `--qdrant_url` or `--qdrant_path`
instead of `--root`, the indexes are the collections of a Qdrant engine and the aliases its collection
aliases, switched atomically by the engine (search.qdrant.aliases); `search.server --backend qdrant
--alias live` follows one.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import storage
from schemas import format_timestamp, utc_now

__all__ = ["AliasError", "FILE", "build_parser", "check_root", "index_path", "main", "read_aliases", "read_layout",
           "resolve", "set_alias"]

FILE = "aliases.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HISTORY = 50  # switches remembered in the file (who served before: the way back)
MAX_BYTES = 1024 * 1024  # an alias file is a few hundred bytes; a service reads it every second


class AliasError(ValueError):
    """An alias or index that does not exist, a bad name, or a switch that lost a race."""


def _path(root: str) -> str:
    return f"{str(root).rstrip('/')}/{FILE}"


def index_path(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


def read_aliases(root: str) -> dict:
    """The alias file's content (`{"aliases": {}, "history": []}` when there is none)."""
    data, _ = storage.read_versioned(_path(root))
    return _parse(data, root)


def _parse(data: bytes | None, root: str) -> dict:
    """The file's content, checked: AliasError for anything but an alias file a switch could have written."""
    if data is None:
        return {"aliases": {}, "history": []}
    try:
        if len(data) > MAX_BYTES:
            raise ValueError(f"{len(data)} bytes, over {MAX_BYTES}")
        content = json.loads(data)
        if not isinstance(content, dict) or not isinstance(content.get("aliases"), dict):
            raise ValueError("no aliases object")
        for alias, name in content["aliases"].items():
            if not (isinstance(name, str) and NAME.match(name)):
                raise ValueError(f"alias {alias!r} names {name!r}, not an index name")
    except (ValueError, RecursionError) as e:
        raise AliasError(f"{_path(root)} is not an alias file: {e}") from None
    if not isinstance(content.get("history"), list):
        content["history"] = []
    return content


def resolve(root: str, alias: str) -> str:
    """The name of the index `alias` serves; AliasError when it names none."""
    name = read_aliases(root)["aliases"].get(alias)
    if name is None:
        raise AliasError(f"no alias {alias!r} in {_path(root)} (set one: python -m search.aliases --root {root} "
                         f"--set {alias}=NAME)")
    return name


def read_layout(root: str, name: str) -> dict:
    """Index `name`'s index.json; AliasError when there is none or it is not an index's."""
    path = f"{index_path(root, name)}/index.json"
    if not storage.exists(path):
        raise AliasError(f"no index {name!r} under {root} (no {path})")
    try:
        layout = json.loads(storage.read_bytes(path))
        if not all(key in layout for key in ("model", "dim", "num_shards")):
            raise ValueError("no model, dim and num_shards")
    except (ValueError, TypeError, RecursionError) as e:
        raise AliasError(f"{path} is not an index's layout: {e}") from None
    return layout


def set_alias(root: str, alias: str, name: str, expect: str | None = None) -> str | None:
    """Points `alias` at index `name` (which must exist under `root`); returns the index it named before.
    `expect`: the switch is made only if the alias still names that index (a rollout that gated against
    it). A concurrent switch between the read and the write is refused, never overwritten."""
    for value, what in ((alias, "alias"), (name, "index name")):
        if not NAME.match(value):
            raise AliasError(f"{what} {value!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    read_layout(root, name)
    data, token = storage.read_versioned(_path(root))
    content = _parse(data, root)
    before = content["aliases"].get(alias)
    if expect is not None and before != expect:
        raise AliasError(f"alias {alias!r} names {before!r}, not {expect!r}: it was switched meanwhile")
    content["aliases"][alias] = name
    content["history"] = (content["history"] + [{"alias": alias, "from": before, "to": name,
                                                  "at": format_timestamp(utc_now())}])[-HISTORY:]
    try:
        storage.replace_if(_path(root), (json.dumps(content, indent=2) + "\n").encode(), token)
    except storage.Changed as e:
        raise AliasError(f"alias {alias!r} not switched: {e} (another switch won; read it and try again)") from None
    return before


def _describe_indexes(root: str) -> dict[str, str]:
    """name → one line about the index (or why it cannot be read: one broken index hides no other)."""
    found = {}
    for path in storage.match(f"{str(root).rstrip('/')}/*/index.json"):
        name = path.rstrip("/").split("/")[-2]
        try:
            layout = read_layout(root, name)
        except AliasError as e:
            found[name] = f"unreadable: {e}"
            continue
        found[name] = (f"{layout['model']}, {layout['dim']}-d, {layout['num_shards']} shard(s), "
                       f"{layout.get('segment_kind', 'hnsw')}")
    return found


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default, and the description as written (its sentence, then the usage lines)."""


def check_root(root: str) -> None:
    """AliasError unless `root` can be a root of named indexes: an existing directory (locally; on object
    storage a prefix needs no creating) that is not itself an index."""
    root = str(root)
    if not storage.is_remote(root):
        path = Path(root)
        if not path.exists():
            raise AliasError(f"--root {root}: no such directory")
        if not path.is_dir():
            raise AliasError(f"--root {root} is a file, not a directory of named indexes")
    if storage.exists(f"{root.rstrip('/')}/index.json"):
        parent, _, name = root.rstrip("/").rpartition("/")
        raise AliasError(f"--root {root} is an index (it holds index.json), not a root of named indexes: give "
                         f"the directory above it (--root {parent or '.'}), where it is the index {name!r}")


def build_parser() -> argparse.ArgumentParser:
    # The module docstring's first paragraph (one sentence over two lines) and its usage lines.
    parser = argparse.ArgumentParser(prog="python -m search.aliases",
                                     description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=_HelpFormatter)
    parser.add_argument("--root", help="The directory (local or gs://) holding the named indexes.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--set", metavar="ALIAS=NAME", help="Point ALIAS at the index NAME.")
    action.add_argument("--show", metavar="ALIAS", help="Print the index ALIAS names (exit 1 when none).")
    parser.add_argument("--expect", metavar="NAME", help="With --set: only if the alias still names NAME.")
    from search.qdrant import cli as qdrant_cli

    qdrant_cli.add_flags(parser, "Qdrant collections and their aliases (instead of --root)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.expect and not args.set:
        parser.error("--expect goes with --set")
    from search.qdrant import cli as qdrant_cli

    refused = qdrant_cli.root_or_engine_refusal(args)
    if refused:
        parser.error(refused)
    if qdrant_cli.chosen(args):
        return _main_qdrant(parser, args)
    try:
        check_root(args.root)
        if args.show:
            print(resolve(args.root, args.show))
            return
        if args.set:
            alias, sep, name = args.set.partition("=")
            if not sep:
                parser.error("--set takes ALIAS=NAME, e.g. live=v2")
            before = set_alias(args.root, alias, name, args.expect)
            print(f"alias {alias}: {before or '(none)'} -> {name}")
            return
        content = read_aliases(args.root)
        by_index: dict[str, list[str]] = {}
        for alias, name in content["aliases"].items():
            by_index.setdefault(name, []).append(alias)
        indexes = _describe_indexes(args.root)
        if not indexes and not content["aliases"]:
            raise AliasError(f"no index under {args.root} yet (an index is ROOT/NAME/index.json: python -m "
                             f"pipelines.index --index_dir {args.root.rstrip('/')}/NAME makes one)")
        for name, line in sorted(indexes.items()):
            names = f"  <- {', '.join(sorted(by_index.get(name, [])))}" if name in by_index else ""
            print(f"{name}: {line}{names}")
        for alias, name in sorted(content["aliases"].items()):
            print(f"alias {alias} -> {name}")
    except (AliasError, OSError) as e:
        parser.exit(1, f"search.aliases: {e}\n")


def _main_qdrant(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from search.qdrant import aliases as collection_aliases
    from search.qdrant import cli as qdrant_cli

    target = qdrant_cli.targets(args)
    try:
        if args.show:
            print(collection_aliases.resolve(target, args.show))
            return
        if args.set:
            alias, sep, name = args.set.partition("=")
            if not sep:
                parser.error("--set takes ALIAS=NAME, e.g. live=v2")
            before = collection_aliases.set_alias(target, alias, name, args.expect)
            print(f"alias {alias}: {before or '(none)'} -> {name}")
            return
        found = collection_aliases.aliases(target)
        by_collection: dict[str, list[str]] = {}
        for alias, name in found.items():
            by_collection.setdefault(name, []).append(alias)
        for name, line in collection_aliases.collections(target).items():
            names = f"  <- {', '.join(sorted(by_collection[name]))}" if name in by_collection else ""
            print(f"{name}: {line}{names}")
        for alias, name in sorted(found.items()):
            print(f"alias {alias} -> {name}")
    except (AliasError, OSError) as e:
        parser.exit(1, f"search.aliases: {e}\n")
    except Exception as e:  # an engine that does not answer or refuses: one line
        from search.qdrant.collection import describe_failure

        parser.exit(1, f"search.aliases: {describe_failure(e, target('aliases'))}\n")


if __name__ == "__main__":
    main()
