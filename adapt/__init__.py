"""adapt: parameter-efficient transfer learning for frozen CLIP models (open_clip)."""
__version__ = "0.1.0"
