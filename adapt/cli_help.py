"""``adapt fit --help``: every recipe section and key with its default and one-line doc, read
from the Config dataclasses themselves (their ``# comment`` lines), so nothing is written twice."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: doc} from the comment on the field's line, else the comment block just above it
    (first sentence). Fields without a comment get ""."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number -> comment text, for every comment token
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    docs = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.lineno
        doc = comments.get(line, "") if not lines[line - 1].lstrip().startswith("#") else ""
        if not doc:
            above, i = [], line - 1
            while i >= 1 and lines[i - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(i, ""))
                i -= 1
            doc = " ".join(above)
        docs[node.target.id] = _first_sentence(doc)
    return docs


def _first_sentence(text: str, limit: int = 62) -> str:
    text = text.replace("``", "")
    if ". " in text:
        text = text.split(". ", 1)[0]
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return repr(v) if v == "" or " " in v else v
    return str(v)


def section_lines(prefix: str, cls: type, skip: tuple = ()) -> list[str]:
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = f"{prefix}{f.name}={_value(_default(f))}"
        doc = docs.get(f.name, "")
        out.append(f"  {key:<38} {doc}" if doc else f"  {key}")
    return out


def recipe_keys_help(width: Optional[int] = 100) -> str:
    from adapt.config import Recipe
    from adapt.methods import get_method, list_methods

    nested = {f.name: f for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(_default(f))}
    lines = ["recipe keys (section.key=default  doc); set any of them in the YAML or as key=value:", ""]
    for name, f in nested.items():
        lines += [f"{name}:"] + section_lines(f"{name}.", type(_default(f))) + [""]
    lines += ["top level:"] + section_lines("", Recipe, skip=tuple(nested) + ("method",)) + [""]
    lines += ["method: method.name=<one of: " + ", ".join(list_methods()) + ">; its keys (defaults = the paper's):"]
    for m in list_methods():
        cls = get_method(m).Config
        keys = ", ".join(f"{f.name}={_value(_default(f))}" for f in dataclasses.fields(cls))
        lines += textwrap.wrap(f"{m}: {keys or '(none)'}", width=width or 100, initial_indent="  ",
                               subsequent_indent="      ")
    lines += ["", "`adapt config RECIPE [key=value ...]` prints a recipe resolved with its overrides."]
    return "\n".join(lines)
