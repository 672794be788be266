"""The sample catalogue of real product photos: Fashion-MNIST (Zalando) from Debian's package.

`build_catalogue` writes the images as PNG and JPEG files (upscaled from 28 px, so the
decoder does real resizing work) and returns product events whose titles, descriptions and
attributes (brand, category, material, price, stock) say what each photo shows. `broken_events` adds one event per
kind of bad input the pipeline must dead-letter.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sample_catalogue.fashion_mnist import CLASSES, load_fashion_mnist

__all__ = ["BRANDS", "MATERIALS", "PRICES", "STYLES", "Product", "build_catalogue", "broken_events"]

# What each Fashion-MNIST class's photos show, as shop listings would name it (the photos are greyscale:
# no colour words, which most of them would contradict), with materials and prices such items have.
STYLES = {
    "T-shirt/top": ("crew-neck tee", "short-sleeve top", "basic t-shirt"),
    "Trouser": ("straight-leg trousers", "slim trousers", "wide-leg trousers"),
    "Pullover": ("knit pullover", "crew-neck jumper", "long-sleeve sweater"),
    "Dress": ("shift dress", "midi dress", "summer dress"),
    "Coat": ("long coat", "zip jacket", "parka"),
    "Sandal": ("strappy sandal", "flat sandal", "slide sandal"),
    "Shirt": ("button-up shirt", "long-sleeve shirt", "oxford shirt"),
    "Sneaker": ("low-top sneaker", "running shoe", "canvas sneaker"),
    "Bag": ("tote bag", "shoulder bag", "handbag"),
    "Ankle boot": ("ankle boot", "chelsea boot", "lace-up boot"),
}
MATERIALS = {
    "T-shirt/top": ("cotton", "linen"), "Trouser": ("denim", "cotton", "wool"), "Pullover": ("wool", "cotton"),
    "Dress": ("cotton", "linen", "viscose"), "Coat": ("wool", "recycled polyester"), "Sandal": ("leather", "suede"),
    "Shirt": ("cotton", "linen"), "Sneaker": ("canvas", "leather", "suede"), "Bag": ("leather", "canvas"),
    "Ankle boot": ("leather", "suede"),
}
PRICES = {"T-shirt/top": (12, 35), "Trouser": (35, 90), "Pullover": (40, 110), "Dress": (35, 120),
          "Coat": (90, 260), "Sandal": (25, 80), "Shirt": (30, 80), "Sneaker": (50, 140), "Bag": (40, 220),
          "Ankle boot": (80, 210)}
BRANDS = ("Nordlicht", "Castello", "Umami", "Kestrel", "Lumen", "Fjord & Co")


@dataclass(frozen=True)
class Product:
    event: dict
    label: int
    image_path: Path


def product_photo(pixels: np.ndarray, size: int) -> Image.Image:
    # Fashion-MNIST is white-on-black; shops show products dark-on-white.
    image = Image.fromarray(255 - pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
    return image.convert("RGB")


def build_catalogue(directory: Path, base_url: str, count: int, *, split: str = "t10k", seed: int = 0,
                    image_size: int = 280, shops: int = 3) -> list[Product]:
    """Writes `count` product photos under `directory` and returns their upsert events: titles say
    what the photo shows (brand and style), attributes are brand, category (the photo's class),
    material, price and stock."""
    images, labels = load_fashion_mnist(split)
    rng = random.Random(seed)
    picks = rng.sample(range(len(images)), count)
    directory.mkdir(parents=True, exist_ok=True)
    products = []
    for n, index in enumerate(picks):
        label = int(labels[index])
        category = CLASSES[label]
        name = f"{n:06d}.{'jpg' if n % 2 else 'png'}"
        product_photo(images[index], image_size).save(directory / name, quality=90)
        style, material, brand = rng.choice(STYLES[category]), rng.choice(MATERIALS[category]), rng.choice(BRANDS)
        low, high = PRICES[category]
        event = {
            "event_id": f"evt-{seed}-{n}",
            "product_id": f"prod-{n:06d}",
            "op": "upsert",
            "version": 1_700_000_000_000 + n,
            "shop_id": f"shop-{n % shops}",
            "title": f"{brand} {style}",
            "description": f"A {material} {style} ({category.lower()}) by {brand}.",
            "image_urls": [f"{base_url.rstrip('/')}/{name}"],
            "attributes": {"brand": brand, "category": category, "material": material,
                           "price": round(rng.uniform(low, high), 2), "in_stock": rng.random() < 0.8},
        }
        products.append(Product(event, label, directory / name))
    return products


def broken_events(base_url: str) -> list[bytes]:
    """One message per kind of bad input; each must end as a dead letter, never a crash."""
    base = base_url.rstrip("/")

    def event(n: int, **fields) -> bytes:
        data = {"event_id": f"bad-{n}", "product_id": f"bad-prod-{n}", "op": "upsert", "version": 1, **fields}
        return json.dumps(data).encode()

    return [
        b"{not json",
        b"\xff\xfe not utf-8",
        json.dumps({"product_id": "x", "op": "upsert", "version": 1, "title": "no event id"}).encode(),
        event(3, op="rename", title="unknown op"),
        event(4, version="7", title="mistyped version"),
        event(5, image_urls=[f"{base}/{i}.png" for i in range(9)]),
        event(6, image_urls=["ftp://example.com/a.png"]),
        event(7, image_urls=["http://169.254.169.254/latest/meta-data"]),
        event(8, image_urls=[f"{base}/missing-404.png"]),
        event(9, image_urls=[f"{base}/not-an-image.txt"]),
    ]
