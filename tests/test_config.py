import pytest

from model_handlers.config import ModelConfig, ModelSpec


@pytest.mark.parametrize(
    "text, backend, name, pretrained",
    [
        ("packaged:effnet-lite0+minilm", "packaged", "effnet-lite0+minilm", ""),
        ("open_clip:ViT-B-32", "open_clip", "ViT-B-32", ""),
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("open_clip:ViT-B-32/gs://bucket/models/clip.pt", "open_clip", "ViT-B-32", "gs://bucket/models/clip.pt"),
        ("open_clip:ViT-B-32//srv/models/clip.pt", "open_clip", "ViT-B-32", "/srv/models/clip.pt"),
    ],
)
def test_specs_parse_and_print_back(text, backend, name, pretrained):
    spec = ModelSpec.parse(text)
    assert (spec.backend, spec.name, spec.pretrained) == (backend, name, pretrained)
    assert str(spec) == text


@pytest.mark.parametrize("text", ["", "clip", "torch:resnet", "open_clip:", "open_clip:/tag", "packaged:other"])
def test_bad_specs_are_refused(text):
    with pytest.raises(ValueError):
        ModelSpec.parse(text)


@pytest.mark.parametrize(
    "changes",
    [
        {"device": "tpu"},
        {"precision": "int8"},
        {"min_batch_size": 0},
        {"min_batch_size": 8, "max_batch_size": 4},
        {"image_batch_size": 0},
        {"max_batch_duration_secs": -1},
        {"image_weight": 1.0},
        {"spec": "nope"},
    ],
)
def test_bad_model_configs_fail_at_construction(changes):
    with pytest.raises(ValueError):
        ModelConfig(**changes)
