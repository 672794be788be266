import numpy as np
import pytest

from model_handlers.fusion import fuse, l2_normalize


def unit(*values):
    return l2_normalize(np.array(values, np.float32))


def test_one_space_is_the_normalised_weighted_sum():
    out = fuse(unit(1, 0), unit(0, 1), shared_space=True, image_dim=2, text_dim=2, image_weight=0.5)
    np.testing.assert_allclose(out, unit(1, 1), atol=1e-6)
    heavy = fuse(unit(1, 0), unit(0, 1), shared_space=True, image_dim=2, text_dim=2, image_weight=0.75)
    assert heavy[0] > heavy[1] and np.isclose(np.linalg.norm(heavy), 1)


def test_two_spaces_concatenate_the_weighted_parts():
    out = fuse(unit(3, 4), unit(1, 0, 0), shared_space=False, image_dim=2, text_dim=3, image_weight=0.5)
    assert out.shape == (5,)
    np.testing.assert_allclose(out, l2_normalize(np.array([0.6, 0.8, 1, 0, 0])), atol=1e-6)


def test_a_missing_part_is_a_zero_block_in_two_spaces():
    out = fuse(None, unit(0, 1, 0), shared_space=False, image_dim=2, text_dim=3)
    np.testing.assert_allclose(out, [0, 0, 0, 1, 0], atol=1e-6)
    out = fuse(unit(1, 1), None, shared_space=False, image_dim=2, text_dim=3)
    np.testing.assert_allclose(out[2:], 0) and np.isclose(np.linalg.norm(out), 1)


def test_a_missing_part_leaves_the_other_in_one_space():
    np.testing.assert_allclose(fuse(None, unit(0, 2), shared_space=True, image_dim=2, text_dim=2), [0, 1], atol=1e-6)


def test_nothing_to_fuse_and_bad_weights_are_errors():
    with pytest.raises(ValueError):
        fuse(None, None, shared_space=True, image_dim=2, text_dim=2)
    for weight in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            fuse(unit(1, 0), unit(0, 1), shared_space=True, image_dim=2, text_dim=2, image_weight=weight)
