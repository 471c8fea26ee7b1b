"""The CoOp protocol's image transforms (bicubic, like CLIP's own preprocessing).

Train: random resized crop, scale (0.08, 1), horizontal flip. Test: resize the short side, centre
crop. Both convert to RGB first, so grey-scale, palette and RGBA files all give 3 channels.
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


class ToRGB:
    """A class rather than a lambda: transforms must pickle for DataLoader workers under spawn."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """``scale``: the crop's area range (Tip-Adapter's cache uses (0.5, 1))."""
    return T.Compose([
        ToRGB(),
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def test_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([
        ToRGB(),
        T.Resize(image_size, interpolation=BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# its name starts with test_: keep pytest from collecting it where a test module imports it
test_transform.__test__ = False
