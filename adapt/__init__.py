"""adapt: parameter-efficient transfer learning for frozen CLIP models (open_clip)."""
from adapt.version import __version__  # noqa: F401


def load_adapter(path, classnames=None, device=None, task=None, task_options=None):
    """An exported adapter as an eval-mode model with ``.preprocess`` (see adapt.inference);
    ``task``: one task of an adapter trained on several datasets; ``task_options``: replace the
    task options its run recorded (``{"slide_window": [crop, stride]}``)."""
    from adapt.inference import load_adapter as _load

    return _load(path, classnames=classnames, device=device, task=task, task_options=task_options)
