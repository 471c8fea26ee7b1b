"""A text-only training stream: captions labelled with the classes they name (TaI-DPT's "texts as
images").

``data.captions.file`` is a caption corpus: a text file of one caption per line, a JSON list of
strings, or a COCO captions file (``{"annotations": [{"caption": ...}, ...]}``, e.g.
``captions_train2017.json``). Each caption is labelled by the classes whose name or synonym it
contains (``data.captions.synonyms``: JSON ``{class: [synonym, ...]}``, matched by normalised
class name; the class name itself always counts), as TaI-DPT's ``datasets/*_distill.py`` do:
words are lemmatised, names of several words are matched first and removed from the caption,
then single words (a several-word name also matches written as one word: "motor bike" ->
"motorbike"); a caption naming no class is dropped. Then, per class, ``template_copies``
copies of "a photo of a {class}." and, with ``templates``, CLIP's 80 ImageNet templates, each
labelled with that class alone (the original's 9 copies and 80 templates).

Lemmatising: the original runs nltk's part-of-speech tagger and WordNet lemmatiser, whose
models need a download. Here a word is lower-cased and its plural form reduced by English
spelling rules (``singular``: "buses" -> "bus", "puppies" -> "puppy", "knives" -> "knife",
"people" kept), applied alike to the captions and to the names: the matches the class-noun
lemmatisation makes (plurals) without a network. Verb and adjective forms are left as written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from adapt.data.class_text import normalised


@dataclass
class CaptionsConfig:
    # the caption corpus (one caption per line, a JSON list, or a COCO captions JSON); relative
    # to the working directory. Methods that train on text (taidpt) read it; others refuse it
    file: Optional[str] = None
    # JSON {class: [synonym, ...]}: other words that name a class in a caption
    synonyms: Optional[str] = None
    # per class, this many copies of "a photo of a {class}." join the stream (the original's 9)
    template_copies: int = 9
    # per class, CLIP's 80 ImageNet templates join the stream (the original's)
    templates: bool = True
    # keep at most this many labelled captions (the first ones); null = all
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if self.template_copies < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("data.captions.template_copies must be >= 0 and data.captions.limit >= 1 (or null)")


_IRREGULAR = {"people": "people", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "sheep": "sheep",
              "fish": "fish", "deer": "deer", "bus": "bus", "glasses": "glasses", "series": "series",
              "species": "species", "news": "news"}
_KEEP_S = ("ss", "us", "is", "ous", "as")  # glass, cactus, tennis, ... are not plurals


def singular(word: str) -> str:
    """The singular of an English noun by its spelling (see the module docstring)."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3 or not w.endswith("s") or w.endswith(_KEEP_S):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("ves") and len(w) > 4:
        return w[:-3] + ("fe" if w[-4] == "i" else "f")
    if w.endswith(("ches", "shes", "xes", "zes", "sses", "uses")):
        return w[:-2]
    if w.endswith("oes") and len(w) > 4:
        return w[:-2]
    return w[:-1]


def lemmas(text: str) -> str:
    """The caption as space-padded singular lower-case words: " a red star and two dog "."""
    return " " + " ".join(singular(w) for w in re.findall(r"[a-z0-9]+", text.lower())) + " "


def read_corpus(path: str) -> list[str]:
    """The captions of a corpus file (see the module docstring), or one message naming the file."""
    file = Path(path).expanduser()
    where = f"data.captions.file={path}"
    if not file.is_file():
        raise ValueError(f"{where}: no such file; give a text file of one caption per line, a JSON list of "
                         "captions, or a COCO captions JSON (annotations/captions_train2017.json)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err}); give a text or JSON file of captions") from None
    if file.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = [a.get("caption") if isinstance(a, dict) else None for a in data["annotations"]]
    if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
        raise ValueError(f"{where}: a JSON corpus is a list of caption strings or a COCO captions file "
                         "({\"annotations\": [{\"caption\": ...}]})")
    return [c.strip() for c in data if c.strip()]


def read_synonyms(path: Optional[str], classnames: Sequence[str]) -> list[list[str]]:
    """Per class, the names that mark it in a caption: its own and its synonyms."""
    names = [[c] for c in classnames]
    if not path:
        return names
    where = f"data.captions.synonyms={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{where}: no such file; give a JSON file {{class: [synonym, ...]}}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not valid JSON ({err}); give {{class: [synonym, ...]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                             for v in data.values()):
        raise ValueError(f"{where}: the file must map each class to a list of synonym strings")
    index = {normalised(c): i for i, c in enumerate(classnames)}
    unknown = [k for k in data if normalised(k) not in index]
    if unknown:
        raise ValueError(f"{where}: {', '.join(map(repr, unknown[:5]))} name no class of this data "
                         f"({', '.join(classnames[:6])}, ...); fix the keys (matched in lower case, '_' as a space)")
    for key, words in data.items():
        names[index[normalised(key)]] += [w for w in words if w.strip()]
    return names


def label_captions(captions: Sequence[str], names: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """The captions that name at least one class, each with its multi-hot label over the
    classes (``names[k]``: the words that name class k), as the original matches them."""
    several: dict[str, int] = {}
    single: dict[str, int] = {}
    for k, words in enumerate(names):
        for w in words:
            key = lemmas(w).strip()
            if " " in key:
                several[key] = k
                single.setdefault(key.replace(" ", ""), k)  # "motor bike" also as "motorbike"
            elif key:
                single[key] = k
    kept, labels = [], []
    for caption in captions:
        text, label = lemmas(caption), [0] * len(names)
        for table in (several, single):  # several-word names first, then removed
            for key, k in table.items():
                if f" {key} " in text:
                    label[k] = 1
                    text = text.replace(f" {key} ", " ")
        if any(label):
            kept.append(caption)
            labels.append(label)
    return kept, labels


def caption_stream(cfg: CaptionsConfig, classnames: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """The whole training stream of ``cfg`` over ``classnames``: labelled captions, then each
    class's template texts."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # CLIP's 80, the original's list

    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    corpus = read_corpus(cfg.file)
    texts, labels = label_captions(corpus, read_synonyms(cfg.synonyms, classnames))
    if not texts:
        raise ValueError(f"data.captions.file={cfg.file}: none of its {len(corpus)} captions names a class "
                         f"({', '.join(classnames[:6])}, ...); give captions that mention the classes, or "
                         "synonyms for them (data.captions.synonyms)")
    if cfg.limit is not None:
        texts, labels = texts[:cfg.limit], labels[:cfg.limit]
    for k, name in enumerate(classnames):
        one = [int(i == k) for i in range(len(classnames))]
        extra = [f"a photo of a {name}."] * cfg.template_copies + ([t.format(name) for t in templates]
                                                                   if cfg.templates else [])
        texts += extra
        labels += [one] * len(extra)
    return texts, labels
