"""A class per pixel: the target is a label map (class index per pixel, ``IGNORE`` = 255 for
pixels that count nowhere), a method's logits are [B, K, h, w] at any resolution and are
upsampled (bilinear) to the label map, as mmsegmentation's ``resize(seg_logit, size=img_shape)``
does before its argmax. Metrics are mmsegmentation's: IoU per class from the intersection and
union accumulated over the whole split (not averaged per image), their mean over the classes
that occur in the split's labels or predictions (mIoU; a class absent from both is NaN there and
left out), pixel accuracy (aAcc) and mean class accuracy (mAcc). The loss is pixel
cross-entropy with the ignore index.

Images are read at their own size. Training crops image and label map together
(``JointTransform``: a random resized crop and a flip, the map with nearest-neighbour
interpolation); evaluation resizes the image's short side to the model's resolution without a
crop and keeps the label map at full resolution, as the originals evaluate whole images
(mmseg's test pipeline: resize keep-ratio, one image per GPU). Label maps of different sizes
cannot share a batch: set ``data.eval_batch_size=1`` for such data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import Metric
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision import tv_tensors

from adapt.tasks.base import Task, register_task, top_rows

IGNORE = 255


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, K, h, w] logits at the label map's [H, W] (bilinear, align_corners=False)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def read_label_map(path: Path) -> np.ndarray:
    """A label-map PNG as a [H, W] uint8 array of class indices (palette PNGs give their indices,
    as VOC's ``SegmentationClass`` files store them)."""
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"{path}: a label map must be a single-channel PNG of class indices "
                             f"(mode L or P), not mode {im.mode}")
        return np.asarray(im, dtype=np.int64).astype(np.int64)


def reduce_zero(label_map: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (no class) -> ``IGNORE``, id i -> i − 1, ``IGNORE`` stays."""
    out = label_map - 1
    out[(label_map == 0) | (label_map == IGNORE)] = IGNORE
    return out


class JointTransform:
    """A torchvision v2 pipeline applied to (image, label map) together; the image is then
    converted and normalised alone. A class so that loaders pickle under spawn."""

    joint = True

    def __init__(self, image_size: int, mean, std, scale=(0.5, 1.0)):
        self.geometry = v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(scale),
                                                         interpolation=T.InterpolationMode.BICUBIC,
                                                         antialias=True),
                                    v2.RandomHorizontalFlip()])
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, label_map: torch.Tensor):
        image, label_map = self.geometry(image, tv_tensors.Mask(label_map))
        return self.finish(image), label_map.as_subclass(torch.Tensor)


def slide_inference(predict, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's slide inference: ``predict`` on [crop, crop] windows every ``stride`` pixels (the
    last window of a row or column moved back to end at the edge; an image smaller than the crop
    is one window of its own size), each window's logits upsampled to the window and summed into
    a full-size map, then divided by how many windows covered each pixel. [B, K, H, W]."""
    b, _, h, w = x.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total, count = None, x.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = upsample(predict(x[:, :, y1:y2, x1:x2]).float(), (y2 - y1, x2 - x1))
            if total is None:
                total = logits.new_zeros(b, logits.shape[1], h, w)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts of (target, prediction) over the pixels whose target is not ignored."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = int(t.max()) if int(t.max()) >= num_classes else int(t.min())
        raise ValueError(f"a label map holds class id {bad}, outside the {num_classes} classes "
                         f"(0..{num_classes - 1}, {IGNORE} = ignore)")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(hist: torch.Tensor) -> dict[str, float]:
    """mIoU, aAcc and mAcc (fractions of 1) of a [K, K] (target, prediction) confusion matrix,
    as mmseg's ``total_area_to_metrics``: a class with no pixel in labels or predictions has
    a NaN IoU and is left out of the mean (``nanmean``)."""
    hist = hist.double()
    inter = hist.diag()
    label_area, pred_area = hist.sum(1), hist.sum(0)
    union = label_area + pred_area - inter
    iou = inter / union  # 0/0 = NaN: the class occurs nowhere
    acc = inter / label_area
    total = hist.sum()
    return {"miou": float(torch.nanmean(iou)), "aacc": float(inter.sum() / total) if total else float("nan"),
            "macc": float(torch.nanmean(acc))}


class SegmentationEvaluator(Metric):
    """Accumulates the split's confusion matrix (summed across DDP processes)."""

    full_state_update = False

    def __init__(self, num_classes: int, primary_only: bool = False):
        super().__init__()
        self.num_classes, self.primary_only = num_classes, primary_only
        self.add_state("hist", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        pred = upsample(logits.detach().float(), targets.shape[-2:]).argmax(1)
        self.hist += confusion(pred, targets, self.num_classes)

    def compute(self):
        scores = segmentation_scores(self.hist)
        return torch.tensor(scores["miou"]) if self.primary_only else scores


@register_task("segmentation")
class Segmentation(Task):
    primary = "miou"
    target = f"a label map per image (class index per pixel, {IGNORE} = ignore)"
    samples_shots = False
    logit_grid = 2
    # label maps are not stored beside cached features: segmentation runs read images
    cacheable = False
    data_options = ("slide_window",)
    recorded_options = ("slide_window",)

    def __init__(self, slide_window=None):
        if slide_window is not None:
            window = [slide_window] if isinstance(slide_window, (int, str)) else list(slide_window)
            if len(window) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                           for v in window) or window[1] > window[0]:
                raise ValueError(f"slide_window={window} must be [crop, stride]: two positive integers, "
                                 "stride <= crop (e.g. [224, 149])")
        self.slide_window = tuple(int(v) for v in slide_window) if slide_window else None

    def infer(self, predict, x):
        return predict(x) if self.slide_window is None else slide_inference(predict, x, *self.slide_window)

    def loss(self, logits, targets):
        return F.cross_entropy(upsample(logits.float(), targets.shape[-2:]), targets.long(),
                               ignore_index=IGNORE)

    def evaluator(self, num_classes: int) -> Metric:
        return SegmentationEvaluator(num_classes)

    def train_metric(self, num_classes: int) -> Metric:
        return SegmentationEvaluator(num_classes, primary_only=True)

    def train_transform(self, image_size, mean, std):
        return JointTransform(image_size, mean, std)

    def test_transform(self, image_size, mean, std):
        # the image arrives as RGB (the data path converts every file); no crop: the whole image
        return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                          T.Normalize(mean, std)])

    def predictions(self, logits, classnames, k, sizes):
        """Per image: its label map at the image's own size (argmax of the upsampled logits,
        uint8) and, as rows, the ``k`` classes covering most of it with their pixel shares."""
        maps, shares = [], []
        for one, size in zip(logits, sizes):
            pred = upsample(one[None].float(), size).argmax(1)[0]
            maps.append(pred.to(torch.uint8).cpu().numpy())
            shares.append(torch.bincount(pred.flatten(), minlength=len(classnames)).double() / pred.numel())
        return top_rows(torch.stack(shares), classnames, k, "share"), maps

    def read(self, image, label, root: Path, transform, reduce_zero_label: bool = False):
        """(image tensor, [H, W] long label map) of one item; ``label`` is the label map's path
        relative to ``root``; ``reduce_zero_label``: the map's 0 is ignored, id i becomes i − 1."""
        label_map = read_label_map(root / label)
        if reduce_zero_label:
            label_map = reduce_zero(label_map)
        if label_map.shape != (image.height, image.width):
            raise ValueError(f"{root / label}: the label map is {label_map.shape[1]}x{label_map.shape[0]} "
                             f"but its image is {image.width}x{image.height}; a label map must have its "
                             "image's size")
        target = torch.from_numpy(label_map)
        if getattr(transform, "joint", False):
            return transform(image, target)
        return (transform(image) if transform is not None else image), target

    def collate(self, batch):
        sizes = {tuple(t.shape) for _, t in batch}
        if len(sizes) > 1:
            raise ValueError(f"label maps of different sizes ({', '.join('x'.join(map(str, s[::-1])) for s in sorted(sizes))}) "
                             "in one evaluation batch: whole images are evaluated at their own size; "
                             "set data.eval_batch_size=1")
        return torch.utils.data.default_collate(batch)
