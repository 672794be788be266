"""The model spec string and the typed, validated settings a ModelHandler carries.

Everything here is small and picklable: it is built at launch (bad combinations fail
there, not on a worker), shipped to workers, and only `load_model()` turns it into
weights on a device (STYLE: ModelHandlers store settings, heavy work happens on load).
"""

from __future__ import annotations

import dataclasses

__all__ = ["ModelConfig", "ModelSpec", "DEFAULT_MODEL", "PRECISIONS", "DEVICES", "model_id", "split_model_id"]

DEFAULT_MODEL = "packaged:effnet-lite0+minilm"
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("open_clip", "packaged")
PACKAGED_MODELS = ("effnet-lite0+minilm",)
HEAD_MARK = "+proj:"


def model_id(spec: str, head_tag: str = "") -> str:
    """The id vectors are labelled with: the spec, and the top-tuned head's tag when one is applied
    (`packaged:effnet-lite0+minilm+proj:fashion-mnist-v1@3f9a0c1b2d4e`). The one place ids are built."""
    return f"{spec}{HEAD_MARK}{head_tag}" if head_tag else str(spec)


def split_model_id(model: str) -> tuple[str, str]:
    """(spec, head tag or '') of a model id."""
    spec, _, tag = model.partition(HEAD_MARK)
    return spec, tag


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`open_clip:ARCH`, `open_clip:ARCH/PRETRAINED` (a tag or a checkpoint path) or `packaged:NAME`."""

    backend: str
    name: str
    pretrained: str = ""

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        backend, sep, rest = spec.partition(":")
        if not sep or backend not in BACKENDS or not rest:
            raise ValueError(f"model spec {spec!r} must look like open_clip:ARCH[/PRETRAINED] or packaged:NAME")
        if backend == "packaged":
            if rest not in PACKAGED_MODELS:
                raise ValueError(f"unknown packaged model {rest!r} (known: {', '.join(PACKAGED_MODELS)})")
            return cls(backend, rest)
        # The architecture never contains '/', a checkpoint path may (gs://bucket/ckpt.pt).
        name, _, pretrained = rest.partition("/")
        if not name:
            raise ValueError(f"model spec {spec!r} names no architecture")
        return cls(backend, name, pretrained)

    def __str__(self) -> str:
        suffix = f"/{self.pretrained}" if self.pretrained else ""
        return f"{self.backend}:{self.name}{suffix}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    spec: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str = "fp32"
    # Products per RunInference batch (BatchElements bounds).
    min_batch_size: int = 1
    max_batch_size: int = 32
    # Images per forward pass; a batch of products can carry up to 8 images each.
    image_batch_size: int = 64
    # >0 turns on Beam's stateful batching across bundles (bursty topics), at a latency cost.
    max_batch_duration_secs: float = 0.0
    # One model per machine, served to every SDK process (saves memory, costs throughput).
    share_model_across_processes: bool = False
    image_weight: float = 0.5
    # A top-tuned head (model_handlers.projection) applied to the image vectors; "" for none.
    projection: str = ""
    # `spec` parsed, once (set by __post_init__).
    model_spec: ModelSpec = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "model_spec", ModelSpec.parse(self.spec))
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size, got {self.min_batch_size} and {self.max_batch_size}"
            )
        if self.image_batch_size < 1:
            raise ValueError("image_batch_size must be at least 1")
        if self.max_batch_duration_secs < 0:
            raise ValueError("max_batch_duration_secs must be >= 0")
        if not 0.0 < self.image_weight < 1.0:
            raise ValueError("image_weight must be strictly between 0 and 1")

    @property
    def model_id(self) -> str:
        """What records carry: the spec, plus the head's tag when one is applied (the head is read
        and checked to be trained on this spec: ValueError if not)."""
        if not self.projection:
            return model_id(self.spec)
        from model_handlers.projection import load_projection  # torch: only when a head is used

        head = load_projection(self.projection)
        head.check_model(self.spec)
        return model_id(self.spec, head.tag)
