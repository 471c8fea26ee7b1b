"""Adaptation methods, registered by short name. Importing this package registers them all."""
from adapt.methods.base import Method, zero_shot_text_features
from adapt.methods.registry import build_method, get_method, list_methods, method_config, register_method

# one import per method file: registration happens at import
from adapt.methods import zeroshot, coop  # noqa: E402,F401
from adapt.methods import vpt  # noqa: E402,F401
from adapt.methods import ivlp  # noqa: E402,F401
from adapt.methods import maple  # noqa: E402,F401
from adapt.methods import promptsrc  # noqa: E402,F401
from adapt.methods import tip_adapter  # noqa: E402,F401
from adapt.methods import tpt, zero, tda, dmn  # noqa: E402,F401
from adapt.methods import cocoop, kgcoop, vp  # noqa: E402,F401

__all__ = ["Method", "build_method", "get_method", "list_methods", "method_config", "register_method",
           "zero_shot_text_features"]
