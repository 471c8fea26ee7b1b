"""``all``: train and test on every class; K shots per class, or supervised with ``shots: 0``."""
from __future__ import annotations

from adapt.settings.base import Setting
from adapt.settings.registry import register_setting


@register_setting("all")
class AllClasses(Setting):
    """Few-shot (``data.shots`` K images per class) or, with ``shots: 0``, every training image
    (the only form for multi-label data, optionally with partial labels, and for segmentation). The behaviour is the
    base class's; this file gives it its name."""

    tasks = ("single_label", "multi_label", "segmentation")
