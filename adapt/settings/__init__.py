"""Settings as registered objects: which classes and images a run trains on, what it evaluates,
how the results are named. One file per setting; ``data.setting`` names one."""
from adapt.settings.base import Plan, Setting
from adapt.settings.registry import get_setting, list_settings, register_setting

from adapt.settings import all, base2novel, cross_dataset, domain_generalization, multi_task, unsupervised  # noqa: E402,F401,A004  (register)


def check_data(cfg) -> None:
    """A data section's setting checks (the setting exists; its own requirements, e.g. targets
    for cross_dataset), before anything loads: the recipe and the data module run them."""
    get_setting(cfg.setting).check(cfg)


__all__ = ["Plan", "Setting", "check_data", "get_setting", "list_settings", "register_setting"]
