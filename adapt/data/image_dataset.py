"""A torch Dataset over ``list[Item]``: reads ``root / item.path`` with PIL (or, for a path
``<file>#<index>``, the record of an array file: ``records.py``), returns (tensor, label); a
multi-hot label comes as a [K] tensor."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from PIL import Image
from torch.utils.data import Dataset

from adapt.data.items import Item, as_target
from adapt.data.records import open_record, record_of


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an RGB image. PIL opens lazily, so decoding is forced here, inside
    the try, so that a truncated file fails with its name rather than deep inside a transform."""
    if not path.is_file():
        record = record_of(path)
        if record is not None and record[0].is_file():
            return open_record(*record)  # its readers name the file in any error
        raise FileNotFoundError(f"image file not found: {record[0] if record else path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all three
        raise OSError(f"cannot read image file {path}: {err}") from err


class ImageDataset(Dataset):
    def __init__(self, items: Sequence[Item], root: Union[str, Path],
                 transform: Optional[Callable] = None, read: Optional[Callable] = None):
        """``read(image, label, root, transform) -> (x, target)``: a task's own reading of an
        item (a segmentation label map is a file beside the image); default: the transform on
        the image and the label as its tensor."""
        self.items = list(items)
        self.root = Path(root)
        self.transform = transform
        self.read = read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = load_image(self.root / item.path)
        if self.read is not None:
            return self.read(image, item.label, self.root, self.transform)
        return (self.transform(image) if self.transform is not None else image), as_target(item.label)
