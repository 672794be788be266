"""Named indexes under one root, and the aliases that say which one serves (as Qdrant, Milvus and
Elasticsearch name them).

    python -m search.aliases --root ROOT                  # the indexes, their models and sizes, the aliases
    python -m search.aliases --root ROOT --set live=v2    # switch an alias (refused if v2 is no index)
    python -m search.aliases --root ROOT --show live      # the index it names (exit 1: none)

ROOT/NAME/ is an index (pipelines.index --index_dir ROOT/NAME); ROOT/aliases.json is
`{"aliases": {"live": "v2"}, "history": [...]}`, replaced whole and atomically (storage.replace_if:
a rename over the old file locally, a generation precondition on Cloud Storage), so a reader sees
the old alias or the new one, and of two switches at once exactly one wins (the other is told).
`search.server --index_dir ROOT --alias live` follows it.
"""

from __future__ import annotations

import argparse
import json
import re

import storage
from schemas import format_timestamp, utc_now

__all__ = ["AliasError", "FILE", "build_parser", "index_path", "main", "read_aliases", "resolve", "set_alias"]

FILE = "aliases.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HISTORY = 50  # switches remembered in the file (who served before: the way back)


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
    if data is None:
        return {"aliases": {}, "history": []}
    try:
        content = json.loads(data)
        if not isinstance(content.get("aliases"), dict):
            raise ValueError("no aliases object")
    except (ValueError, AttributeError) as e:
        raise AliasError(f"{_path(root)} is not an alias file: {e}") from None
    content.setdefault("history", [])
    return content


def resolve(root: str, alias: str) -> str:
    """The name of the index `alias` serves; AliasError when it names none."""
    name = read_aliases(root)["aliases"].get(alias)
    if name is None:
        raise AliasError(f"no alias {alias!r} in {_path(root)} (set one: python -m search.aliases --root {root} "
                         f"--set {alias}=NAME)")
    return name


def set_alias(root: str, alias: str, name: str, expect: str | None = None) -> str | None:
    """Points `alias` at index `name` (which must exist under `root`); returns the index it named before.
    `expect`: the switch is made only if the alias still names that index (a rollout that gated against
    it). A concurrent switch between the read and the write is refused, never overwritten."""
    for value, what in ((alias, "alias"), (name, "index name")):
        if not NAME.match(value):
            raise AliasError(f"{what} {value!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    if not storage.exists(f"{index_path(root, name)}/index.json"):
        raise AliasError(f"no index {name!r} under {root} (no {index_path(root, name)}/index.json)")
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


def _indexes(root: str) -> dict[str, dict]:
    found = {}
    for path in storage.match(f"{str(root).rstrip('/')}/*/index.json"):
        name = path.rstrip("/").split("/")[-2]
        found[name] = json.loads(storage.read_bytes(path))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.aliases", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", required=True, help="The directory (local or gs://) holding the named indexes.")
    parser.add_argument("--set", metavar="ALIAS=NAME", help="Point ALIAS at the index NAME.")
    parser.add_argument("--expect", metavar="NAME", help="With --set: only if the alias still names NAME.")
    parser.add_argument("--show", metavar="ALIAS", help="Print the index ALIAS names (exit 1 when none).")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
        for name, layout in sorted(_indexes(args.root).items()):
            names = f"  <- {', '.join(sorted(by_index.get(name, [])))}" if name in by_index else ""
            print(f"{name}: {layout['model']}, {layout['dim']}-d, {layout['num_shards']} shard(s), "
                  f"{layout.get('segment_kind', 'hnsw')}{names}")
        for alias, name in sorted(content["aliases"].items()):
            print(f"alias {alias} -> {name}")
    except (AliasError, OSError) as e:
        parser.exit(1, f"search.aliases: {e}\n")


if __name__ == "__main__":
    main()
