"""Top-tuned projections: a small MLP head that maps a model's image vectors to tuned embeddings.

`evaluation.run` trains the head on frozen embeddings (Adevinta paper §3.3) and saves it as a
versioned artifact; the embed pipeline, the index pipeline and the search service load it with
`--projection PATH` (local or any filesystem Beam knows, e.g. gs://). Tuned vectors live in a
space of their own, so their model id names the head and its content digest:

    packaged:effnet-lite0+minilm+proj:fashion-mnist-v1@3f9a0c1b2d4e

and an index built from untuned vectors refuses them (and the other way round). The head maps the
image tower's unit vectors; on a shared-space backend (CLIP) text vectors go through it too, so
text queries still land in the space of the tuned image vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import storage
from model_handlers.config import model_id
from model_handlers.fusion import l2_normalize

__all__ = ["FORMAT", "Projection", "build_head", "load_projection", "save_projection"]

FORMAT = "product-embeddings/projection"


def build_head(layers: Sequence[int]) -> torch.nn.Sequential:
    """Linear layers of the given widths with ReLU between them (the tuned embedding is the last)."""
    if len(layers) < 2:
        raise ValueError("a projection needs at least an input and an output width")
    modules: list[torch.nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(layers, layers[1:])):
        if i:
            modules.append(torch.nn.ReLU())
        modules.append(torch.nn.Linear(width_in, width_out))
    return torch.nn.Sequential(*modules)


def save_projection(path: str | Path, head: torch.nn.Sequential, *, model: str, name: str, version: int,
                    trained_on: str) -> None:
    """Writes the head and what it was trained for; `name` and `version` become part of the model id."""
    layers = [m.in_features for m in head if isinstance(m, torch.nn.Linear)] + [head[-1].out_features]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "model": model, "name": name, "version": int(version), "layers": layers,
                "trained_on": trained_on, "state_dict": head.state_dict()}, path)


@dataclasses.dataclass(frozen=True, eq=False)
class Projection:
    model: str
    name: str
    version: int
    digest: str
    layers: tuple[int, ...]
    head: torch.nn.Sequential

    @property
    def dim_in(self) -> int:
        return self.layers[0]

    @property
    def dim_out(self) -> int:
        return self.layers[-1]

    @property
    def tag(self) -> str:
        """What the model id says of the head: its name, version and content digest."""
        return f"{self.name}-v{self.version}@{self.digest[:12]}"

    @property
    def model_id(self) -> str:
        return model_id(self.model, self.tag)

    def check_model(self, spec: str) -> None:
        """ValueError unless the head was trained on `spec`'s vectors."""
        if self.model != spec:
            raise ValueError(f"projection {self.name} was trained on {self.model}'s vectors, not {spec}'s")

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """Unit (N, dim_in) vectors → unit (N, dim_out) tuned vectors."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim_in:
            raise ValueError(f"projection {self.name} takes (N, {self.dim_in}) vectors, got {vectors.shape}")
        if not len(vectors):
            return np.zeros((0, self.dim_out), np.float32)
        with torch.inference_mode():
            tuned = self.head(torch.from_numpy(vectors)).numpy()
        return l2_normalize(tuned)


@functools.lru_cache(maxsize=8)
def load_projection(path: str) -> Projection:
    """Reads and checks an artifact; ValueError says what is wrong with it (cached per process)."""
    try:
        data = storage.read_bytes(path)
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"cannot read projection {path}: {e}") from e
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unpickling errors; all mean "not a head"
        raise ValueError(f"{path} is not a projection artifact: {e}") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a projection artifact (no format {FORMAT!r})")
    layers = tuple(int(width) for width in saved["layers"])
    head = build_head(layers)
    try:
        head.load_state_dict(saved["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"projection {path}: weights do not match layers {layers}: {e}") from e
    head.eval().requires_grad_(False)
    return Projection(model=str(saved["model"]), name=str(saved["name"]), version=int(saved["version"]),
                      digest=hashlib.sha256(data).hexdigest(), layers=layers, head=head)

