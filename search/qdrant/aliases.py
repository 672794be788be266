"""Collection aliases: which collection serves, switched atomically by the engine (Qdrant's
`update_collection_aliases` applies its delete and create as one change), as search.aliases switches
the alias file of named FAISS indexes. `search.server --backend qdrant --alias live` follows one."""

from __future__ import annotations

from typing import Callable

import re

from search.aliases import AliasError
from search.qdrant.collection import (COLLECTION_PATTERN, LayoutMismatch, QdrantTarget, connected,
                                      describe_failure, status_of)

__all__ = ["aliases", "collections", "resolve", "set_alias"]


def aliases(target: Callable[[str], QdrantTarget]) -> dict[str, str]:
    """alias → collection, on the engine `target` reaches (target(name) is that collection's target)."""
    with connected(target("aliases")) as engine, engine.locked():
        return {a.alias_name: a.collection_name for a in engine.client.get_aliases().aliases}


def collections(target: Callable[[str], QdrantTarget]) -> dict[str, str]:
    """name → one line about each collection (model, dimension, kind, live products), or why it is not one
    this product made."""
    with connected(target("aliases")) as engine, engine.locked():
        names = [c.name for c in engine.client.get_collections().collections]
    out = {}
    for name in sorted(names):
        with connected(target(name)) as collection:
            try:
                layout = collection.layout()
                out[name] = (f"{layout['model']}, {layout['dim']}-d, {layout['segment_kind']}, "
                             f"{collection.count_live()} live products")
            except LayoutMismatch as e:
                out[name] = f"not a product collection: {e}"
    return out


def resolve(target: Callable[[str], QdrantTarget], alias: str) -> str:
    """The collection `alias` names; AliasError when it names none."""
    found = aliases(target)
    if alias not in found:
        where = target("aliases")
        flag = f"--qdrant_url {where.url}" if where.url else f"--qdrant_path {where.path}"
        raise AliasError(f"no collection alias {alias!r} at {where.url or where.path} (aliases: "
                         f"{', '.join(sorted(found)) or 'none'}; set one: python -m search.aliases {flag} "
                         f"--set {alias}=COLLECTION)")
    return found[alias]


def set_alias(target: Callable[[str], QdrantTarget], alias: str, name: str, expect: str | None = None) -> str | None:
    """Points `alias` at collection `name` (one this product made); the collection it named before.
    `expect`: only if the alias still names that collection. Qdrant has no conditional alias change, so
    the check and the switch are two requests: a switch between them is not seen (one rollout at a time)."""
    from qdrant_client import models

    for value, what in ((alias, "alias"), (name, "collection name")):
        if not re.match(COLLECTION_PATTERN, value):
            raise AliasError(f"{what} {value[:80]!r}: a Qdrant name is letters, digits, '.', '_' or '-', "
                             f"starting with a letter or digit, at most 255 characters")
    with connected(target(name)) as collection:
        found = aliases(target)
        if name in found:
            raise AliasError(f"{name!r} is an alias (of {found[name]!r}), not a collection: point {alias!r} at a "
                             f"collection")
        try:
            layout = collection.layout()
        except LayoutMismatch as e:
            raise AliasError(str(e)) from None
        if layout is None:
            raise AliasError(f"no collection {name!r} at {collection.target.url or collection.target.path}")
        before = found.get(alias)
        if expect is not None and before != expect:
            raise AliasError(f"alias {alias!r} names {before!r}, not {expect!r}: it was switched meanwhile")
        changes = [models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))] if before else []
        changes.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=name,
                                                                                   alias_name=alias)))
        try:
            with collection.locked():
                collection.client.update_collection_aliases(changes)
        except Exception as e:  # e.g. an alias named like a collection: the engine's reason, in one line
            if status_of(e) is None and not isinstance(e, ValueError):
                raise
            raise AliasError(f"alias {alias!r} not set: {describe_failure(e, collection.target)}") from None
    return before
