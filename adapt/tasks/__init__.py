"""Task kinds, registered by short name. Importing this package registers them all."""
from adapt.tasks.base import Task, get_task, list_tasks, register_task

# one import per task file: registration happens at import
from adapt.tasks import single_label, multi_label, segmentation  # noqa: E402,F401

__all__ = ["Task", "get_task", "list_tasks", "register_task"]
