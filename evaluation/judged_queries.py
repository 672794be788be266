"""Judged shopping queries for the demo catalogue, made from its attributes by stated rules.

    python -m evaluation.judged_queries [--products 300] [--seed 0] [--output evaluation/judged/demo.jsonl]

The queries are what a shopper of this catalogue would type: a kind of product ("ankle boots"), a
material and a kind ("suede ankle boots") or a brand and a kind ("Kestrel sneakers"); kinds are
named as shoppers name them, which is not always how titles do ("jumper" for titles that say
"sweater"). Each product is labelled for each query, as in Amazon's ESCI data:

- E(xact): the product's category is the query's, and so is every attribute the query names;
- S(ubstitute): the category is the query's, an attribute the query names differs;
- C(omplement): the category is one COMPLEMENTS lists for the query's (a bag for a dress);
- I(rrelevant): the rest (not written: an unjudged product counts as irrelevant).

The catalogue is `sample_catalogue.products.build_catalogue(products, seed)`, the one `make demo` indexes
with its defaults; the rows are JSON lines of {query, product_id, label} (evaluation.qrels).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sample_catalogue.products import BRANDS, MATERIALS, build_catalogue

__all__ = ["COMPLEMENTS", "KINDS", "judge", "queries"]

# A category as shoppers ask for it.
KINDS = {"T-shirt/top": "t-shirt", "Trouser": "trousers", "Pullover": "jumper", "Dress": "dress", "Coat": "coat",
         "Sandal": "sandals", "Shirt": "shirt", "Sneaker": "trainers", "Bag": "bag", "Ankle boot": "ankle boots"}
# What goes with what: a query for the key makes products of these categories complements.
COMPLEMENTS = {"T-shirt/top": ("Trouser",), "Trouser": ("Shirt", "Sneaker"), "Pullover": ("Trouser",),
               "Dress": ("Sandal", "Bag"), "Coat": ("Ankle boot", "Pullover"), "Sandal": ("Dress",),
               "Shirt": ("Trouser",), "Sneaker": ("Trouser", "T-shirt/top"), "Bag": ("Dress", "Coat"),
               "Ankle boot": ("Coat", "Trouser")}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "judged" / "demo.jsonl"


def queries() -> list[tuple[str, str, dict]]:
    """(query text, category, attributes it names): every kind, every kind in each of its materials, and
    each kind from two brands (which two, by a fixed rotation)."""
    out = []
    for n, (category, kind) in enumerate(KINDS.items()):
        out.append((kind, category, {}))
        out += [(f"{material} {kind}", category, {"material": material}) for material in MATERIALS[category]]
        out += [(f"{brand} {kind}", category, {"brand": brand}) for brand in (BRANDS[n % 6], BRANDS[(n + 3) % 6])]
    return out


def judge(attributes: dict, category: str, named: dict) -> str:
    """The ESCI label of a product (its attributes) for a query of `category` naming `named`."""
    if attributes["category"] == category:
        return "E" if all(attributes.get(k) == v for k, v in named.items()) else "S"
    return "C" if attributes["category"] in COMPLEMENTS[category] else "I"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m evaluation.judged_queries", description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300, help="the catalogue's size (make demo's default)")
    parser.add_argument("--seed", type=int, default=0, help="the catalogue's seed (make demo's default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as photos:
        products = build_catalogue(Path(photos), "http://127.0.0.1/", args.products, seed=args.seed)
    rows = []
    for text, category, named in queries():
        for product in products:
            label = judge(product.event["attributes"], category, named)
            if label != "I":
                rows.append({"query": text, "product_id": product.event["product_id"], "label": label})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(queries())} queries, {len(rows)} judgements (E/S/C) for {args.products} products -> {args.output}")
    return args.output


if __name__ == "__main__":
    main()
