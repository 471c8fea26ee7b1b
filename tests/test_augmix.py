"""AugMix on tensors, as TPT uses it: operations match PIL's (the original's), views are seeded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from adapt.methods import augmix as am
from adapt.methods import build_method


def _image(seed: int = 0, size: int = 32) -> Image.Image:
    """A smooth image (bilinear resampling differs little between implementations on it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def _tensor(img: Image.Image) -> torch.Tensor:
    return TF.to_tensor(img)


def _same_draws(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


@pytest.mark.parametrize("coeffs", [(1, 0.03, 0, 0, 1, 0), (1, 0, 0, -0.02, 1, 0), (1, 0, 7, 0, 1, 0),
                                    (1, 0, 0, 0, 1, -5)])
def test_affine_matches_pil(coeffs):
    img = _image()
    ours = am.pil_affine(_tensor(img), coeffs)
    ref = _tensor(img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR))
    # PIL leaves pixels whose source falls outside black; bilinear edges may differ by a pixel
    inner = (ref.sum(0) > 0)[1:-1, 1:-1]
    diff = (ours - ref).abs()[:, 1:-1, 1:-1].amax(0)[inner]
    assert diff.max() <= 2 / 255 + 1e-6


def test_point_operations_match_pil():
    img, gen = _image(1), torch.Generator().manual_seed(3)
    x = _tensor(img)
    for _ in range(5):
        expected_level = 0.1 + 0.9 * float(torch.rand((), generator=_same_draws(gen), dtype=torch.float64))
        threshold = 256 - int(expected_level * 256 / 10)
        ours = am.solarize(x, gen, 1.0)
        assert torch.equal(_tensor(ImageOps.solarize(img, threshold)), ours)
    # at severity 1 posterize always keeps 4 bits, as the original's int_parameter rounds down
    assert torch.equal(am.posterize(x, gen, 1.0), _tensor(ImageOps.posterize(img, 4)))
    assert torch.equal(am.equalize(x, gen, 1.0), _tensor(ImageOps.equalize(img)))
    assert torch.equal(am.autocontrast(x, gen, 1.0), _tensor(ImageOps.autocontrast(img)))


def test_rotation_is_at_most_3_degrees_and_matches_pil():
    img, gen = _image(2), torch.Generator().manual_seed(0)
    x = _tensor(img)
    for _ in range(6):
        g = _same_draws(gen)
        level = 0.1 + 0.9 * float(torch.rand((), generator=g, dtype=torch.float64))
        degrees = int(level * 30 / 10) * (-1.0 if float(torch.rand((), generator=g)) < 0.5 else 1.0)
        assert abs(degrees) <= 3
        ours = am.rotate(x, gen, 1.0)
        ref = _tensor(img.rotate(degrees, resample=Image.BILINEAR))
        assert (ours - ref)[:, 4:-4, 4:-4].abs().max() <= 3 / 255


def test_augmix_is_seeded_and_mixes_towards_the_input():
    x = _tensor(_image(3))
    a = am.augmix(x, torch.Generator().manual_seed(1))
    b = am.augmix(x, torch.Generator().manual_seed(1))
    c = am.augmix(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < (a - x).abs().mean() < 0.25 and a.min() >= 0 and a.max() <= 1


def test_tpt_views_with_augmix(tiny_backbone):
    names, templates = ["red", "green"], ["a photo of a {}."]
    plain = build_method("tpt", {"n_views": 8, "seed": 0}, tiny_backbone, names, templates)
    mixed = build_method("tpt", {"n_views": 8, "seed": 0, "augmix": True}, tiny_backbone, names, templates)
    image = torch.randn(3, tiny_backbone.image_size, tiny_backbone.image_size).clamp(-1.5, 1.5)
    p, m = plain.views(image), mixed.views(image)
    assert torch.equal(p[0], image) and torch.equal(m[0], image)  # the original view is untouched
    assert (p[1:] - m[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every crop was mixed
    assert torch.equal(mixed.views(image), m)  # seeded by (seed, image)
