"""Both backends on real code paths: the packaged one on its shipped weights, open_clip on a tiny config."""

import numpy as np
import pytest
import torch

from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig
from tests.conftest import TINY_CLIP


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_packaged_backend_declares_and_produces_its_dimensions(packaged_backend):
    assert packaged_backend.model_id == "packaged:effnet-lite0+minilm"
    assert (packaged_backend.image_dim, packaged_backend.text_dim, packaged_backend.embedding_dim) == (1280, 384, 1664)
    out = packaged_backend.embed_products([(list(pixels(2, 224)), "Red linen shirt"), ([], "Blue jeans")])
    assert [v.image_count for v in out] == [2, 0]
    assert out[0].image_embedding.shape == (1280,) and out[0].text_embedding.shape == (384,)
    assert out[1].image_embedding.shape == (0,)
    for vectors in out:
        assert vectors.embedding.shape == (1664,)
        assert np.isclose(np.linalg.norm(vectors.embedding), 1.0, atol=1e-5)


def test_packaged_text_tower_knows_what_words_mean(packaged_backend):
    shirt, tee, boots = packaged_backend.encode_texts(["red cotton shirt", "crimson cotton t-shirt", "leather ankle boots"])
    assert shirt @ tee > shirt @ boots + 0.1


def test_packaged_text_is_truncated_not_refused(packaged_backend):
    long_text = "linen shirt " * 2000
    assert packaged_backend.encode_texts([long_text]).shape == (1, 384)


def test_batching_does_not_change_vectors(packaged_backend):
    images = pixels(3, 224, seed=1)
    together = packaged_backend.encode_images(images)
    alone = np.concatenate([packaged_backend.encode_images(images[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-4)


@pytest.mark.parametrize("name", ["packaged_backend", "tiny_clip"])
def test_a_batch_of_mixed_products_fuses_each_as_if_alone(request, name):
    """Images of consecutive products share one forward pass and are averaged per product."""
    backend = request.getfixturevalue(name)
    images = pixels(6, backend.preprocess.crop_size, seed=3)
    products = [(list(images[:2]), "Red linen shirt"), ([], "Blue jeans"), ([images[2]], ""),
                (list(images[3:]), "Leather ankle boots")]
    together = backend.embed_products(products)
    assert [v.image_count for v in together] == [2, 0, 1, 3]
    for product, batched in zip(products, together):
        alone = backend.embed_products([product])[0]
        for part in ("embedding", "image_embedding", "text_embedding"):
            np.testing.assert_allclose(getattr(batched, part), getattr(alone, part), atol=1e-4)
    mean = backend.encode_images(images[3:]).mean(axis=0)
    np.testing.assert_allclose(together[3].image_embedding, mean / np.linalg.norm(mean), atol=1e-4)
    assert together[2].text_embedding.shape == (0,) and together[1].image_embedding.shape == (0,)


@pytest.mark.parametrize("batch", [1, 5])
def test_the_frozen_image_tower_matches_the_eager_model(packaged_backend, batch):
    """The CPU graph is traced at batch 2 with batch norm folded in: any batch size, the same features."""
    from model_handlers.packaged_backend import image_tower

    assert isinstance(packaged_backend.image_tower, torch.jit.ScriptModule)
    eager = image_tower(torch.device("cpu"), frozen=False)
    assert not isinstance(eager, torch.jit.ScriptModule)
    # Normalised pixels as the backend makes them: channels-last strides from the HWC decode.
    x = torch.from_numpy(pixels(batch, 224, seed=batch)).permute(0, 3, 1, 2).float().div(128.0).sub(1.0)
    with torch.inference_mode():
        frozen, expected = packaged_backend.image_tower(x), eager(x)
    assert frozen.shape == (batch, 1280)
    torch.testing.assert_close(frozen, expected, atol=1e-4, rtol=1e-4)


def test_a_query_lands_in_the_space_of_the_products(packaged_backend):
    query = packaged_backend.embed_query(text="Blue jeans")
    product = packaged_backend.embed_products([([], "Blue jeans")])[0].embedding
    assert query.shape == (1664,) and np.isclose(query @ product, 1.0, atol=1e-5)
    image_query = packaged_backend.embed_query(image=pixels(1, 224)[0])
    assert image_query.shape == (1664,) and np.allclose(image_query[1280:], 0)


def test_tiny_open_clip_is_one_space_and_deterministic(tiny_clip):
    assert tiny_clip.shared_space and tiny_clip.embedding_dim == 64 and tiny_clip.model_id == TINY_CLIP
    again = load_backend(ModelConfig(spec=TINY_CLIP, device="cpu"))
    images = pixels(2, 64)
    np.testing.assert_allclose(tiny_clip.encode_images(images), again.encode_images(images), atol=1e-6)
    np.testing.assert_allclose(tiny_clip.encode_texts(["a"]), again.encode_texts(["a"]), atol=1e-6)


def test_open_clip_loads_a_checkpoint_from_a_path(tiny_clip, tmp_path):
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in tiny_clip.model.state_dict().items()}
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": state}, checkpoint)
    loaded = load_backend(ModelConfig(spec=f"{TINY_CLIP}/{checkpoint}", device="cpu"))
    assert loaded.model_id == f"{TINY_CLIP}/{checkpoint}"
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    assert not np.allclose(loaded.encode_texts(["a"]), tiny_clip.encode_texts(["a"]), atol=1e-4)


def test_missing_checkpoints_and_unknown_architectures_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backend(ModelConfig(spec=f"{TINY_CLIP}/{tmp_path}/missing.pt", device="cpu"))
    with pytest.raises(ValueError, match="no model config"):
        load_backend(ModelConfig(spec="open_clip:No-Such-Arch", device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load_backend(ModelConfig(spec=TINY_CLIP, device="cuda"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_matches_fp32_within_tolerance(packaged_backend, precision):
    """Autocast on the CPU stands in for the GPU here; the tolerance is the one docs/ARCHITECTURE.md §8 states."""
    reduced = load_backend(ModelConfig(device="cpu", precision=precision))
    # TorchScript's autocast covers a frozen graph only in part: reduced precision runs the eager tower.
    assert not isinstance(reduced.image_tower, torch.jit.ScriptModule)
    images = pixels(2, 224, seed=3)
    cosine = (packaged_backend.encode_images(images) * reduced.encode_images(images)).sum(axis=1)
    assert cosine.min() > 0.99
    text_cosine = (packaged_backend.encode_texts(["wool coat"]) * reduced.encode_texts(["wool coat"])).sum()
    assert text_cosine > 0.99
