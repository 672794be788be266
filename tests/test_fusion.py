import numpy as np
import pytest

from model_handlers.fusion import fuse, l2_normalize


def rows(*vectors):
    """Unit rows; `None` is a missing part, a row of zeros of the given width."""
    return np.stack([np.zeros(v, np.float32) if isinstance(v, int) else l2_normalize(np.array(v, np.float32))
                     for v in vectors])


def test_one_space_is_the_normalised_weighted_sum():
    out = fuse(rows([1, 0]), rows([0, 1]), shared_space=True, image_weight=0.5)
    np.testing.assert_allclose(out, rows([1, 1]), atol=1e-6)
    heavy = fuse(rows([1, 0]), rows([0, 1]), shared_space=True, image_weight=0.75)[0]
    assert heavy[0] > heavy[1] and np.isclose(np.linalg.norm(heavy), 1)


def test_two_spaces_concatenate_the_weighted_parts():
    out = fuse(rows([3, 4]), rows([1, 0, 0]), shared_space=False, image_weight=0.5)
    assert out.shape == (1, 5)
    np.testing.assert_allclose(out[0], l2_normalize(np.array([0.6, 0.8, 1, 0, 0])), atol=1e-6)


def test_a_missing_part_is_a_zero_block_in_two_spaces():
    out = fuse(rows(2, [1, 1]), rows([0, 1, 0], 3), shared_space=False)
    np.testing.assert_allclose(out[0], [0, 0, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(out[1, 2:], 0)
    assert np.isclose(np.linalg.norm(out[1]), 1)


def test_a_missing_part_leaves_the_other_in_one_space():
    out = fuse(rows(2, [3, 0]), rows([0, 2], 2), shared_space=True)
    np.testing.assert_allclose(out, [[0, 1], [1, 0]], atol=1e-6)


def test_each_row_is_fused_as_it_would_be_alone():
    rng = np.random.default_rng(0)
    images, texts = rows(*rng.normal(size=(6, 4)), 4), rows(*rng.normal(size=(6, 3)), [1, 2, 3])
    texts[2] = 0  # a product without text
    together = fuse(images, texts, shared_space=False)
    for i in range(len(images)):
        np.testing.assert_allclose(fuse(images[i:i + 1], texts[i:i + 1], shared_space=False)[0], together[i], atol=1e-6)


def test_nothing_to_fuse_and_bad_weights_are_errors():
    with pytest.raises(ValueError, match="needs an image or a text"):
        fuse(rows([1, 0], 2), rows([0, 1], 2), shared_space=True)  # the second row has neither
    for weight in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            fuse(rows([1, 0]), rows([0, 1]), shared_space=True, image_weight=weight)
