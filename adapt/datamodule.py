"""The LightningDataModule: load a registered dataset and apply the recipe's setting to it.

The setting object (``adapt/settings/``, named by ``data.setting``) draws the K-shot sample
over all classes (or reads a manifest), picks the training classes (base2novel: the base half)
and builds the evaluation sets (``test``; ``base`` and ``novel``; one per target dataset).

Its loaders yield ``(x, label)`` where ``x`` is images, or the frozen encoder's features of the
same images from the feature cache (train: ``views`` augmented views, a different one each epoch;
val/test: the test transform), or, in training, the token ids of a caption stream for a method
trained on text (``data.captions``: TaI-DPT). Which one is decided once, by ``serve``, from what
the method declares; nothing downstream branches on it.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from adapt.data.captions import caption_stream
from adapt.data.checks import check_images, class_counts, warn_short_classes
from adapt.data.config import DataConfig
from adapt.data.feature_cache import (CachedEvalDataset, CachedFeatures, CachedViewsDataset, EpochViewSampler,
                                     encode_items)
from adapt.data.fewshot import write_manifest
from adapt.data.image_dataset import ImageDataset
from adapt.data.items import DatasetSplits, Item
from adapt.data.priors import load_label_prior
from adapt.data.sharding import EpochOrder, train_loader
from adapt.data.support import SupportSet
from adapt.data.support_sources import check_support
from adapt.data.transforms import test_transform, train_transform
from adapt.settings import check_data, get_setting
from adapt.tasks import Task, get_task

log = logging.getLogger(__name__)


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
        check_data(self.cfg)
        # the setting (adapt/settings/) decides the training classes, the sample and the eval sets
        self.setting = get_setting(self.cfg.setting)
        self.set_preprocess(image_size, mean, std)
        self.seed = int(seed)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dataset: Optional[DatasetSplits] = None
        self._task: Optional[Task] = None
        self.train_classnames: list[str] = []
        # data.unlabelled.prior: each training class's share (adapt/data/priors.py), or None
        self.label_prior: Optional[list[float]] = None
        self.templates: list[str] = []
        self.train_items: list[Item] = []
        self.val_items: list[Item] = []
        self.eval_sets: "OrderedDict[str, tuple[list[str], list[Item]]]" = OrderedDict()
        self.eval_templates: dict[str, list[str]] = {}  # templates of sets from other datasets
        # multi_task: the task of every training class and of every evaluation set (else empty)
        self.class_tasks: list[str] = []
        self.eval_tasks: dict[str, str] = {}
        self.skipped_images: dict[str, int] = {}  # split -> unreadable files left out (bad_images=skip)
        self.train_counts: dict[str, int] = {}  # class -> training images (all classes, before base2novel)
        self.short_classes: list[str] = []
        # the recipe's ``cache``: encodings a method asks for (``encode``) go through the cache
        self.use_feature_cache = True
        # "images", or "features" once ``serve`` chose cached features for a method
        self.inputs = "images"
        self._encoder = None  # (backbone, train views, device, dense outputs) when serving features
        # the served method's own training transform (``Method.train_transform``), or None
        self._method_transform: Optional[Callable] = None
        # each split's features, once per run (evaluation and the zero-shot baseline share them)
        self._loaded: dict[tuple[str, bool, tuple], CachedFeatures] = {}  # (split, train, dense outputs)
        # data.captions: the labelled texts, and their token ids once ``serve`` tokenized them
        self.caption_texts: list[str] = []
        self.caption_labels: list[list[int]] = []
        self._captions: Optional[TensorDataset] = None
        self._support = None  # data.support made ready (checked, rendered) by ``setup``

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
        dataset = self.setting.dataset(cfg)
        self.setting.check_dataset(cfg, dataset)
        plan = self.setting.plan(cfg, dataset, self.seed)
        # the prior file against the training classes: a bad one is one message, before any image
        # is read or any model loads
        prior = cfg.unlabelled.prior if cfg.unlabelled is not None else None
        self.label_prior = load_label_prior(prior, plan.train_classnames)
        # every selected file, before any model time is spent (missing / unreadable images);
        # the evaluation sets by name (test; base, novel; each cross-dataset target)
        before = {"train": plan.train, "val": plan.val, **{k: v[1] for k, v in plan.eval_sets.items()}}
        kept = check_images(dataset.root, before, cfg.bad_images)
        self.skipped_images = {s: len(before[s]) - len(kept[s]) for s in before if len(before[s]) != len(kept[s])}
        left_out = {it.path for s in before for it in set(before[s]) - set(kept[s])}
        sample_train = [it for it in plan.sample_train if it.path not in left_out]
        sample_val = [it for it in plan.sample_val if it.path not in left_out]
        self.train_items, self.train_classnames, self.val_items = kept["train"], plan.train_classnames, kept["val"]
        if sample_train:  # the sample over all classes (none in the unsupervised setting)
            self.train_counts = class_counts(sample_train, dataset.classnames)
            self.short_classes = warn_short_classes(self.train_counts, cfg.shots)
        self.eval_sets = OrderedDict((k, (names, kept[k])) for k, (names, _) in plan.eval_sets.items())
        self.eval_templates = plan.eval_templates
        self.class_tasks, self.eval_tasks = list(plan.class_tasks), dict(plan.eval_tasks)
        for name, (classnames, items) in self.eval_sets.items():
            if not items:
                raise ValueError(f"the {name!r} evaluation set of {dataset.name!r} is empty "
                                 f"(no test images of its {len(classnames)} classes)")
        if not self.train_items:
            raise ValueError(f"no training images in {dataset.name!r} at {dataset.root}")
        self.templates = list(dataset.templates)
        # the declared support set, checked (and rendered) before any model loads
        self._support = check_support(cfg.support, dataset.name, dataset.classnames, cfg.class_text.descriptions,
                                      cfg.bad_images)
        self.dataset = dataset
        if cfg.captions.file:  # a text stream to train on, labelled and checked before any model loads
            self.caption_texts, self.caption_labels = caption_stream(cfg.captions, self.train_classnames)
            log.info("data.captions: %d texts name the %d classes", len(self.caption_texts), len(self.train_classnames))
        # the sample over all classes: the base subset is a pure function of it
        self.write_manifest(sample_train, sample_val, plan.extra)

    def write_manifest(self, train: Sequence[Item], val: Sequence[Item], extra: Optional[dict] = None) -> None:
        if self.run_dir is None:
            return
        cfg, names = self.cfg, self.dataset.classnames
        write_manifest(self.run_dir / "manifest.json", self.dataset.name, names, train, val,
                       cfg.shots, self.seed, cfg.setting,
                       extra={"train_classnames": self.train_classnames,
                              "eval_classnames": {k: v[0] for k, v in self.eval_sets.items()}, **(extra or {})})

    @property
    def task(self) -> Task:
        """The task kind of the data (``adapt/tasks/``): how an item is read, transformed and
        collated when its target is more than a label."""
        self.setup()
        if self._task is None:
            self._task = get_task(self.dataset.task)
        return self._task

    @property
    def read(self) -> Optional[Callable]:
        """The task's item reader with the dataset's options for it (a segmentation dataset's
        ``reduce_zero_label``); None: the data path's own."""
        read, options = self.task.read, self.dataset.read_options
        return functools.partial(read, **options) if read is not None and options else read

    def eval_names(self) -> list[str]:
        self.setup()
        return list(self.eval_sets)

    def dataloader(self, items: Sequence[Item], transform: Optional[Callable], batch_size: int,
                   shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """A loader over any item list of this dataset (methods use it for caches and pseudo-labels)."""
        self.setup()
        workers = self.cfg.num_workers
        return DataLoader(ImageDataset(items, self.dataset.root, transform, read=self.read),
                          batch_size=batch_size, collate_fn=self.task.collate,
                          shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def encode(self, backbone, items: Sequence[Item], transform: Callable, split: str, views: int = 1,
               normalize: bool = True, device: Optional[Union[str, torch.device]] = None,
               dense: Sequence[str] = (), root: Optional[Path] = None):
        """Frozen image features [views, n, d] (+ labels) of any item list, through the feature
        cache (``data.cache_dir``): methods that build something from images (Tip-Adapter's
        keys) pay for each encoding once across runs, seeds and hyper-parameters. ``root``: the
        folder the items' paths are relative to (default: the dataset's; a support set's own)."""
        self.setup()
        return encode_items(backbone, items, root or self.dataset.root, transform, views=views,
                            dataset=self.dataset.name, split=split, normalize=normalize,
                            cache=self.use_feature_cache, cache_dir=self.cfg.cache_dir,
                            batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.num_workers,
                            device=device, dense=dense, dtype=getattr(torch, self.cfg.cache_dtype))

    def support_set(self, backbone, device: Optional[Union[str, torch.device]] = None) -> SupportSet:
        """The support set of ``data.support`` over the dataset's classes; a retrieval source is
        ranked here, with ``backbone``. Without one declared (or ``source: train``): the training
        images (few-shot), marked to be encoded under augmentation."""
        self.setup()
        prepared = self._support
        if prepared is None:
            return SupportSet("train", self.dataset.root, list(self.train_items), list(self.train_classnames),
                              augmented=True, report={"support_images": len(self.train_items)})
        if isinstance(prepared, SupportSet):
            return prepared
        from adapt.data.class_text import ClassTextConfig, load_class_text
        from adapt.data.world.support import retrieve

        def encode(items, root):
            return self.encode(backbone, items, self.test_transform(), "pool", normalize=False, device=device,
                               root=root).features[0]

        text = None
        if self.cfg.support.prompt == "descriptions":
            text = load_class_text(ClassTextConfig(descriptions=self.cfg.class_text.descriptions), prepared.classnames)
            text = {c: text.sentences_of(c) for c in prepared.classnames}
        return retrieve(prepared, backbone, encode, self.templates[0], text)

    def serve(self, method, backbone, cache: bool = True, views: int = 1,
              device: Optional[Union[str, torch.device]] = None) -> str:
        """Decide, once, what the loaders yield for ``method``: its frozen image features when
        the recipe allows the cache (``cache``) and the method declares it reads nothing else
        (``supports_feature_cache``, no gradient steps at test time); else images. ``views``
        augmented views of each training image are encoded. Returns "features" or "images"."""
        # a task whose targets the cache cannot store (label maps) reads images
        use = cache and method.supports_feature_cache and not method.grad_at_test and self.task.cacheable
        encoder = (backbone, int(views), device, tuple(method.dense_inputs)) if use else None
        if encoder is None or self._encoder is None or encoder[:3] != self._encoder[:3]:
            self._loaded = {}  # features of another backbone or view count are never reused
        self._encoder = encoder
        self.inputs = "features" if use else "images"
        self._method_transform = method.train_transform
        # a method trained on text reads the caption stream's token ids in training (its
        # evaluation reads images or their features, as above)
        self._captions = None
        if method.trains_on == "captions":
            tokens = backbone.tokenizer(self.caption_texts)  # on the CPU, for the loader
            self._captions = TensorDataset(tokens, torch.tensor(self.caption_labels, dtype=torch.long))
        return self.inputs

    def features(self, items: Sequence[Item], split: str, train: bool) -> CachedFeatures:
        """Frozen, unnormalized features of ``items`` (train: the augmented views)."""
        backbone, views, device, dense = self._encoder
        if (split, train, dense) not in self._loaded:
            augment = train and views > 0
            transform = self.train_transform() if augment else self.test_transform()
            self._loaded[split, train, dense] = self.encode(backbone, items, transform, split,
                                                            views=views if augment else 1, normalize=False,
                                                            device=device, dense=dense)
        return self._loaded[split, train, dense]

    def train_transform(self):
        return (self.task.train_transform or train_transform)(self.image_size, self.mean, self.std)

    def training_transform(self):
        """What the training images go through: the served method's own transform (MUST's
        views) when it has one, else the data's augmentation (``train_transform``)."""
        own = self._method_transform(self.image_size, self.mean, self.std) if self._method_transform else None
        return own if own is not None else self.train_transform()

    def test_transform(self):
        return (self.task.test_transform or test_transform)(self.image_size, self.mean, self.std)

    def train_dataloader(self, world_size: Optional[int] = None, rank: Optional[int] = None) -> DataLoader:
        """This process's training loader: its slice of every global batch (``data.batch_size``)
        of an epoch order drawn from the seed, over the images or, when serving features, over
        their cached views (a different one of each image every epoch). ``world_size`` / ``rank``
        default to the attached trainer's. Workers are not kept across epochs: each epoch's
        workers are seeded from the global generator at that epoch, which a checkpoint restores,
        so a resumed run draws the augmentations of an uninterrupted one."""
        self.setup()
        if world_size is None:
            world_size = self.trainer.world_size if self.trainer is not None else 1
        if rank is None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
        bs = self.cfg.batch_size
        if self._captions is not None:
            return train_loader(self._captions, EpochOrder(len(self._captions), self.seed), bs, rank, world_size)
        if self._encoder is None:
            return train_loader(ImageDataset(self.train_items, self.dataset.root, self.training_transform(),
                                             read=self.read),
                                EpochOrder(len(self.train_items), self.seed), bs, rank, world_size,
                                collate_fn=self.task.collate,
                                num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available())
        cached = self.features(self.train_items, "train", train=True)
        sampler = EpochViewSampler(len(cached.labels), cached.features.shape[0], shuffle=True, seed=self.seed)
        return train_loader(CachedViewsDataset(cached.features, cached.labels), sampler, bs, rank, world_size)

    def eval_dataloader(self, items: Sequence[Item], split: str) -> DataLoader:
        if self._encoder is None:
            return self.dataloader(items, self.test_transform(), self.cfg.eval_batch_size)
        cached = self.features(items, split, train=False)
        return DataLoader(CachedEvalDataset(cached.features[0], cached.labels), batch_size=self.cfg.eval_batch_size)

    def val_dataloader(self):
        self.setup()
        return self.eval_dataloader(self.val_items, "val") if self.val_items else []

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation set, in ``eval_sets`` order."""
        self.setup()
        return [self.eval_dataloader(items, f"test:{name}") for name, (_, items) in self.eval_sets.items()]
