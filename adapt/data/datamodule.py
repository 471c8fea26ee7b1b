"""The LightningDataModule: load a registered dataset, take the K-shot sample, apply the setting.

Order follows the protocol: the few-shot sample is drawn over all classes (or read from a
manifest), then base2novel restricts train and val to the base classes; the test split becomes
one evaluation set per class subset (``test``, or ``base`` and ``novel``), each relabelled 0..k-1.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from adapt.data.checks import check_images, class_counts, warn_short_classes
from adapt.data.config import DataConfig
from adapt.data.fewshot import few_shot_splits, write_manifest
from adapt.data.image_dataset import ImageDataset
from adapt.data.items import DatasetSplits, Item
from adapt.data.registry import build_dataset
from adapt.data.sharding import EpochOrder, train_loader
from adapt.data.splits import subsample_classes
from adapt.data.transforms import test_transform, train_transform

EVAL_SUBSETS = {"all": ("test",), "base2novel": ("base", "novel")}


def as_data_config(cfg: Union[DataConfig, DictConfig, dict]) -> DataConfig:
    """The recipe hands a DictConfig; loaders want the dataclass (``dataclasses.replace`` works)."""
    if isinstance(cfg, DataConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        return obj if isinstance(obj, DataConfig) else DataConfig(**obj)
    return DataConfig(**cfg)


class AdaptDataModule(pl.LightningDataModule):
    def __init__(self, cfg: Union[DataConfig, DictConfig], image_size: Optional[int],
                 mean: Optional[Sequence[float]], std: Optional[Sequence[float]], seed: int,
                 run_dir: Optional[Union[str, Path]] = None):
        """``image_size`` / ``mean`` / ``std`` may come later (``set_preprocess``): the runner
        loads and checks the data before it loads the backbone, so that a wrong path costs
        seconds, not a model download."""
        super().__init__()
        self.cfg = as_data_config(cfg)
        self.set_preprocess(image_size, mean, std)
        self.seed = int(seed)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dataset: Optional[DatasetSplits] = None
        self.train_classnames: list[str] = []
        self.templates: list[str] = []
        self.train_items: list[Item] = []
        self.val_items: list[Item] = []
        self.eval_sets: "OrderedDict[str, tuple[list[str], list[Item]]]" = OrderedDict()
        self.skipped_images: dict[str, int] = {}  # split -> unreadable files left out (bad_images=skip)
        self.train_counts: dict[str, int] = {}  # class -> training images (all classes, before base2novel)
        self.short_classes: list[str] = []
        # the recipe's ``cache``: encodings a method asks for (``encode``) go through the cache
        self.use_feature_cache = True

    def set_preprocess(self, image_size: Optional[int], mean: Optional[Sequence[float]],
                       std: Optional[Sequence[float]]) -> None:
        # data.image_size overrides the backbone's resolution (null = the backbone's own)
        size = self.cfg.image_size or image_size
        self.image_size = int(size) if size else None
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is not None:  # idempotent: Lightning calls setup once per stage
            return
        cfg = self.cfg
        dataset = build_dataset(cfg)
        names = dataset.classnames
        if cfg.setting == "base2novel" and len(names) < 2:
            raise ValueError(f"data.setting=base2novel needs at least 2 classes; {dataset.name!r} has {len(names)}")
        train, val = few_shot_splits(dataset, cfg.shots, self.seed, cfg.allow_fewer_shots, cfg.manifest)
        # every selected file, before any model time is spent (missing / unreadable images)
        before = {"train": train, "val": val, "test": dataset.test}
        kept = check_images(dataset.root, before, cfg.bad_images)
        self.skipped_images = {s: len(before[s]) - len(kept[s]) for s in before if len(before[s]) != len(kept[s])}
        train, val, dataset.test = kept["train"], kept["val"], kept["test"]
        self.train_counts = class_counts(train, names)
        self.short_classes = warn_short_classes(self.train_counts, cfg.shots)
        train_subset = "base" if cfg.setting == "base2novel" else "all"
        self.train_items, self.train_classnames = subsample_classes(train, names, train_subset)
        self.val_items, _ = subsample_classes(val, names, train_subset)
        self.eval_sets = OrderedDict()
        for name in EVAL_SUBSETS[cfg.setting]:
            items, classnames = subsample_classes(dataset.test, names, "all" if name == "test" else name)
            if not items:
                raise ValueError(f"the {name!r} evaluation set of {dataset.name!r} is empty "
                                 f"(no test images of its {len(classnames)} classes)")
            self.eval_sets[name] = (classnames, items)
        if not self.train_items:
            raise ValueError(f"no training images in {dataset.name!r} at {dataset.root}")
        self.templates = list(dataset.templates)
        if self.run_dir is not None:
            # the sample over all classes: the base subset is a pure function of it
            write_manifest(self.run_dir / "manifest.json", dataset.name, names, train, val,
                           cfg.shots, self.seed, cfg.setting,
                           extra={"train_classnames": self.train_classnames,
                                  "eval_classnames": {k: v[0] for k, v in self.eval_sets.items()}})
        self.dataset = dataset

    def eval_names(self) -> list[str]:
        self.setup()
        return list(self.eval_sets)

    def dataloader(self, items: Sequence[Item], transform: Optional[Callable], batch_size: int,
                   shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """A loader over any item list of this dataset (methods use it for caches and pseudo-labels)."""
        self.setup()
        workers = self.cfg.num_workers
        return DataLoader(ImageDataset(items, self.dataset.root, transform), batch_size=batch_size,
                          shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def encode(self, backbone, items: Sequence[Item], transform: Callable, split: str, views: int = 1,
               normalize: bool = True, device: Optional[Union[str, torch.device]] = None):
        """Frozen image features [views, n, d] (+ labels) of any item list, through the feature
        cache (``data.cache_dir``): methods that build something from images (Tip-Adapter's
        keys) pay for each encoding once across runs, seeds and hyper-parameters."""
        from adapt.data.feature_cache import encode_items

        self.setup()
        return encode_items(backbone, items, self.dataset.root, transform, views=views,
                            dataset=self.dataset.name, split=split, normalize=normalize,
                            cache=self.use_feature_cache, cache_dir=self.cfg.cache_dir,
                            batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.num_workers,
                            device=device)

    def train_transform(self):
        return train_transform(self.image_size, self.mean, self.std)

    def test_transform(self):
        return test_transform(self.image_size, self.mean, self.std)

    def train_dataloader(self, world_size: int = 1, rank: int = 0) -> DataLoader:
        """This process's training loader: its slice of every global batch (``data.batch_size``)
        of an epoch order drawn from the seed. Workers are not kept across epochs: each epoch's
        workers are seeded from the global generator at that epoch, which a checkpoint restores,
        so a resumed run draws the augmentations of an uninterrupted one."""
        self.setup()
        workers = self.cfg.num_workers
        return train_loader(ImageDataset(self.train_items, self.dataset.root, self.train_transform()),
                            EpochOrder(len(self.train_items), self.seed), self.cfg.batch_size, rank,
                            world_size, num_workers=workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        self.setup()
        if not self.val_items:
            return []
        return self.dataloader(self.val_items, self.test_transform(), self.cfg.eval_batch_size)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation set, in ``eval_sets`` order."""
        self.setup()
        return [self.dataloader(items, self.test_transform(), self.cfg.eval_batch_size)
                for _, items in self.eval_sets.values()]
