"""Recipe section ``data``: which dataset, which setting, how many shots, how to load it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from adapt.data.captions import CaptionsConfig
from adapt.data.class_text import ClassTextConfig
from adapt.data.multitask import MultiTaskConfig
from adapt.data.support import SupportConfig
from adapt.data.priors import UnlabelledConfig


@dataclass
class DataConfig:
    # dataset registry key (``imagefolder``, ``csv``, ``zhou``, the generated ``world_*`` tasks, ...)
    dataset: str = "imagefolder"
    # dataset root folder; for ``csv`` image paths in the CSV are relative to it
    root: Optional[str] = None
    # optional per-dataset file (CSV file for ``csv``, split JSON for ``zhou``); relative to root
    split_file: Optional[str] = None
    # prompt template(s) overriding the dataset's own; "{}" is replaced by the class name
    templates: Optional[list[str]] = None
    # a registered setting (adapt/settings/): ``all`` (few-shot, or supervised with shots: 0),
    # ``base2novel``, ``cross_dataset``, ``domain_generalization``, ``unsupervised`` (UPL),
    # ``multi_task`` (several datasets at once: data.tasks)
    setting: str = "all"
    # cross_dataset / domain_generalization: the datasets evaluated besides the source, each a
    # dataset name (read from data.root) or {dataset, root, split_file}
    targets: list[Any] = field(default_factory=list)
    # multi_task: the datasets trained together with data.dataset (the first task), each a
    # dataset name or {dataset, root, split_file, templates, name} (adapt/data/multitask.py)
    tasks: list[Any] = field(default_factory=list)
    # multi_task: the classifier (union / per_task) and a per-task base-to-novel split
    multi_task: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    # K images per class for training (validation gets min(K, 4)); 0 or negative = all images
    shots: int = 16
    # a class with fewer than K training images is an error unless this is true; then all of its
    # images are taken, as the CoOp protocol's sampler does
    allow_fewer_shots: bool = False
    # unreadable (truncated, corrupt) images among the selected files: ``error`` names them and
    # stops before training; ``skip`` leaves them out and counts them in results.json
    bad_images: str = "error"
    # optional text file (one class name per line, relative to root) that fixes the class set and
    # its order, for csv datasets; a label outside it is an error naming the CSV lines
    classnames_file: Optional[str] = None
    # multi-label data: the fraction of (image, class) label entries kept known in training
    # (DualCoOp's partial labels); the rest become -1, drawn seeded and stored in the manifest
    partial_labels: float = 1.0
    # segmentation label maps whose 0 means "no class" (ADE20K, PASCAL Context-59): it becomes
    # the ignore index 255 and every other id moves down one (mmseg's reduce_zero_label);
    # null = the dataset's own convention
    reduce_zero_label: Optional[bool] = None
    # segmentation evaluation by a sliding window, [crop, stride] in pixels of the resized image
    # (mmseg's test_cfg mode='slide'); null = the whole image in one pass (mode='whole')
    slide_window: Optional[list[int]] = None
    # single-label data: a class tree (JSON mapping each internal node to its children, the leaves
    # being the classes; adapt/tasks/hierarchy.py); evaluation then also reports ProTeCt's
    # hierarchical consistency (hca) and mean tree-cut (mta) accuracies, and ProTeCt trains on it
    hierarchy: Optional[str] = None
    # class text beyond the templates (adapt/data/class_text.py): description sentences per class
    # (CuPL's files), descriptor phrases per class (VCD's), matched to the classes by name; the
    # methods that build a hand-written classifier (zero-shot, the adapters, VPT, ...) use them
    class_text: ClassTextConfig = field(default_factory=ClassTextConfig)
    # a caption corpus to train on instead of images (adapt/data/captions.py: TaI-DPT), labelled
    # by the classes each caption names; evaluation still reads the images
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    # a support set (adapt/data/support.py): labelled images of the classes that are not the
    # target's training split (SuS-X): a folder of class subfolders, the world's renderer, or
    # retrieval from a captioned world pool; checked when the data is set up
    support: SupportConfig = field(default_factory=SupportConfig)
    # unlabelled target images and the label prior (adapt/data/priors.py): a folder replacing the
    # training split as data.setting=unsupervised's pool; "uniform" or a {class: share} JSON file,
    # checked against the classes before anything loads (CLIPPR's prior)
    unlabelled: UnlabelledConfig = field(default_factory=UnlabelledConfig)
    # rerun on exactly the images of an earlier run: path to its ``manifest.json``
    manifest: Optional[str] = None
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 2
    # input resolution; null = the backbone's own
    image_size: Optional[int] = None
    # feature cache (recipe ``cache: true``): augmented views of each training image whose frozen
    # features are cached; every epoch trains on a different one of them (each used once per
    # cache_views epochs; at most max_epochs are made). 0 = one view with the test transform
    cache_views: int = 10
    # where cached features live; null = $ADAPT_CACHE_DIR/features or ~/.cache/adapt/features
    cache_dir: Optional[str] = None
    # storage type of cached features: float32, or float16 (half the memory and disk; dense
    # patch-token caches of ViT-B/16 take 197 x 512 values per image and view)
    cache_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.support, dict):  # built from a plain mapping, not through OmegaConf
            self.support = SupportConfig(**self.support)
        # the setting's own checks (adapt/settings/ builds on this package, so it runs them:
        # ``check_data``, called by the recipe and by the data module)
        if self.bad_images not in ("error", "skip"):
            raise ValueError(f"data.bad_images={self.bad_images!r} is not one of error, skip")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.cache_dtype not in ("float32", "float16"):
            raise ValueError(f"data.cache_dtype={self.cache_dtype!r} is not one of float32, float16")
        if not 0.0 < self.partial_labels <= 1.0:
            raise ValueError(f"data.partial_labels={self.partial_labels} must be in (0, 1] (the fraction "
                             "of label entries kept known; 1 = every label)")
        if self.slide_window is not None:
            window = list(self.slide_window)
            if len(window) != 2 or not all(isinstance(v, int) and v > 0 for v in window) or window[1] > window[0]:
                raise ValueError(f"data.slide_window={window} must be [crop, stride]: two positive integers, "
                                 "stride <= crop (e.g. [224, 149])")
        if isinstance(self.multi_task, dict):
            self.multi_task = MultiTaskConfig(**self.multi_task)
        if self.tasks and self.setting != "multi_task":  # they would be ignored without a word
            raise ValueError(f"data.tasks lists the datasets trained together in data.setting=multi_task, "
                             f"not in data.setting={self.setting}; set data.setting=multi_task or drop data.tasks")
        if isinstance(self.unlabelled, dict):  # DataConfig(unlabelled={...}) in code, as a recipe writes it
            self.unlabelled = UnlabelledConfig(**self.unlabelled)
        folder = self.unlabelled.folder if self.unlabelled is not None else None
        if folder and self.setting != "unsupervised":  # it would be ignored without a word
            raise ValueError(f"data.unlabelled.folder={folder} is the unlabelled pool of data.setting=unsupervised, "
                             f"not of data.setting={self.setting}; set data.setting=unsupervised or drop it")
        if self.cache_views < 0:
            raise ValueError(f"data.cache_views must be >= 0 (0 = no augmentation), got {self.cache_views}")
