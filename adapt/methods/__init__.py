"""Adaptation methods, registered by short name. Importing this package registers them all."""
from adapt.methods.base import (HandWrittenClassifier, Method, MethodOutput, zero_shot_text_features)
from adapt.methods.registry import (build_method, get_method, list_methods, method_config, parse_method_section,
                                    register_method, unregister_method)

# one import per method file: registration happens at import
from adapt.methods import zeroshot, coop  # noqa: E402,F401
from adapt.methods import vpt  # noqa: E402,F401
from adapt.methods import ivlp  # noqa: E402,F401
from adapt.methods import maple  # noqa: E402,F401
from adapt.methods import promptsrc  # noqa: E402,F401
from adapt.methods import tip_adapter  # noqa: E402,F401
from adapt.methods import tpt, zero, tda, dmn  # noqa: E402,F401
from adapt.methods import cocoop, kgcoop, vp  # noqa: E402,F401
from adapt.methods import linear_probe  # noqa: E402,F401
from adapt.methods import zslp  # noqa: E402,F401
from adapt.methods import clip_adapter  # noqa: E402,F401
from adapt.methods import taskres  # noqa: E402,F401
from adapt.methods import lora  # noqa: E402,F401
from adapt.methods import norm_bias  # noqa: E402,F401
from adapt.methods import wiseft  # noqa: E402,F401
from adapt.methods import calip  # noqa: E402,F401
from adapt.methods import dualcoop  # noqa: E402,F401

__all__ = ["HandWrittenClassifier", "Method", "MethodOutput", "build_method", "get_method", "list_methods",
           "method_config", "parse_method_section", "register_method", "unregister_method",
           "zero_shot_text_features"]
from adapt.methods import maskclip  # noqa: E402,F401
from adapt.methods import plot  # noqa: E402,F401
from adapt.methods import prograd  # noqa: E402,F401
from adapt.methods import lasp  # noqa: E402,F401
from adapt.methods import subpt  # noqa: E402,F401
from adapt.methods import bpl  # noqa: E402,F401
from adapt.methods import proda  # noqa: E402,F401
from adapt.methods import protect  # noqa: E402,F401
from adapt.methods import reprompt  # noqa: E402,F401
from adapt.methods import cpl  # noqa: E402,F401
from adapt.methods import clippr  # noqa: E402,F401
from adapt.methods import descriptions  # noqa: E402,F401
from adapt.methods import taidpt  # noqa: E402,F401
from adapt.methods import susx  # noqa: E402,F401
from adapt.methods import sgva  # noqa: E402,F401
from adapt.methods import must  # noqa: E402,F401
from adapt.methods import upt  # noqa: E402,F401
from adapt.methods import cavpt  # noqa: E402,F401
from adapt.methods import softcpt  # noqa: E402,F401
from adapt.methods import mvlpt  # noqa: E402,F401
from adapt.methods import denseclip  # noqa: E402,F401
from adapt.methods import vtclip  # noqa: E402,F401
from adapt.methods import svladapter  # noqa: E402,F401
