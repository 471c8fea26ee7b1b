"""Class hierarchies as data (ProTeCt's taxonomies): a tree whose leaves are the dataset's classes
and whose internal nodes are named groups of them ("warm colour" over red, orange, ...).

The file is JSON, one object mapping every internal node to its children, in order::

    {"colour": ["warm colour", "cool colour"],
     "warm colour": ["red", "orange", "yellow"],
     "cool colour": ["green", "blue"]}

The root is the one node that is no node's child (it is never a label: every tree cut expands
it); a name that is no key is a leaf and must be a class of the dataset. Names are matched to
classes in their readable form (``clean_classname``: underscores are spaces), and the file is
checked whole before anything loads: every leaf a class, every class a leaf, one parent per node,
one root, no cycle.

``ClassTree.over(classnames)`` is the tree restricted to a class list (base-to-novel: the base or
the novel classes; internal nodes left without a leaf drop out), indexed the way the metrics and
ProTeCt's losses read it: ``names`` lists the classes first, in the given order, then the
remaining internal nodes in depth-first order, so a method pointed at ``names`` scores every
node and column ``c < len(classnames)`` is class ``c``.

A tree cut (ProTeCt) chooses which internal nodes to expand; its label set is the nodes whose
parent is expanded and which are not expanded themselves, so every leaf is covered by exactly
one label. Training draws cuts by keeping each internal node expanded with probability 1 − p
(the root always; a node under a collapsed one is collapsed); evaluation uses a fixed, seeded
set of distinct cuts drawn at several rates (``evaluation_cuts``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch


def clean_classname(name: str) -> str:
    """A name's readable form, as ``adapt.data.items.clean_classname`` makes every class name
    (tasks sit beside the data layer and do not import it)."""
    return name.replace("_", " ").strip()

__all__ = ["ClassTree", "TreeView", "TreeCut", "EVAL_CUTS", "EVAL_CUT_RATES"]

# ProTeCt's test protocol: 25 distinct cuts, 5 each at collapse rates 0.9, 0.7, 0.5, 0.3, 0.1
# (sample_treecuts.py --multi, treecuts_25_multi.pkl)
EVAL_CUTS = 25
EVAL_CUT_RATES = (0.9, 0.7, 0.5, 0.3, 0.1)
_EXAMPLE = '{"colour": ["warm colour", "cool colour"], "warm colour": ["red", "orange"], "cool colour": ["blue"]}'


def _fail(source: str, problem: str) -> ValueError:
    return ValueError(f"data.hierarchy={source}: {problem}")


class ClassTree:
    """A validated class tree; ``children`` maps each internal node to its children's names."""

    def __init__(self, children: dict, source: str = "<tree>"):
        self.source = source
        if not isinstance(children, dict) or not children:
            raise _fail(source, "the file must hold one JSON object mapping each internal node to the list "
                                f"of its children, e.g. {_EXAMPLE}")
        self.children: dict[str, list[str]] = {}
        parent: dict[str, str] = {}
        for node, kids in children.items():
            name = clean_classname(str(node))
            if not isinstance(kids, list) or not kids or not all(isinstance(k, str) and k.strip() for k in kids):
                raise _fail(source, f"node {name!r} must map to a non-empty list of child names, got {kids!r}")
            if name in self.children:
                raise _fail(source, f"node {name!r} is listed twice (names are compared with '_' read as a space)")
            kids = [clean_classname(k) for k in kids]
            for kid in kids:
                if kid in parent:
                    raise _fail(source, f"{kid!r} is a child of both {parent[kid]!r} and {name!r}; a tree gives "
                                        "each node one parent (rename one of them if they are different things)")
                parent[kid] = name
            self.children[name] = kids
        roots = [n for n in self.children if n not in parent]
        if len(roots) != 1:
            problem = ("no node is without a parent, so the tree has a cycle" if not roots else
                       f"it has {len(roots)} roots ({', '.join(roots)}); add one node whose children they are")
            raise _fail(source, problem)
        self.root = roots[0]
        self.parent = parent
        # depth-first from the root: every node reached once, or the rest sit on a cycle
        order, stack = [], [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children.get(node, ())))
        unreached = [n for n in self.children if n not in set(order)]
        if unreached:
            raise _fail(source, f"nodes {', '.join(unreached)} are not under the root {self.root!r} (a cycle)")
        self.order = order  # depth-first pre-order, root first
        self.leaves = [n for n in order if n not in self.children]

    @classmethod
    def load(cls, path) -> "ClassTree":
        file = Path(path).expanduser()
        if not file.is_file():
            raise _fail(str(path), f"no such file; give a JSON file mapping each internal node of the class "
                                   f"tree to its children, e.g. {_EXAMPLE}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _fail(str(path), f"not valid JSON ({err}); the file maps each internal node to its "
                                   f"children, e.g. {_EXAMPLE}") from None
        return cls(data, str(path))

    def check_classes(self, classnames: Sequence[str]) -> None:
        """Every class of the dataset is a leaf and every leaf a class, or one message naming them."""
        names = [clean_classname(c) for c in classnames]
        internal = [n for n in names if n in self.children]
        if internal:
            raise _fail(self.source, f"classes {_few(internal)} are internal nodes of the tree; a class must "
                                     "be a leaf (name the group otherwise)")
        missing = [n for n in names if n not in self.parent]
        if missing:
            raise _fail(self.source, f"classes {_few(missing)} are not in the tree; add each as a child of "
                                     "the node it belongs to")
        extra = sorted(set(self.leaves) - set(names))
        if extra:
            raise _fail(self.source, f"leaves {_few(extra)} are not classes of this dataset; remove them or "
                                     "fix their spelling (classes: " + _few(names) + ")")

    def over(self, classnames: Sequence[str]) -> "TreeView":
        """The tree restricted to ``classnames`` (names that are internal nodes are skipped, so
        ``over(view.names)`` is ``view`` again); raises when none of them is a leaf."""
        leaves = [n for n in (clean_classname(c) for c in classnames) if n not in self.children]
        return TreeView(self, tuple(leaves))


def _few(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class TreeCut:
    """A label set of the tree: ``labels`` (indices into ``TreeView.names``, ascending) and, per
    class, the position in ``labels`` of the label covering it (``mapping`` [C])."""
    labels: torch.Tensor
    mapping: torch.Tensor

    def key(self) -> tuple[int, ...]:
        return tuple(self.labels.tolist())


class TreeView:
    """A ``ClassTree`` over one class list, as index tensors (see the module docstring)."""

    def __init__(self, tree: ClassTree, classes: tuple[str, ...]):
        unknown = [c for c in classes if c not in tree.parent]
        if unknown:
            raise _fail(tree.source, f"classes {_few(unknown)} are not in the tree; add each as a child of the "
                                     "node it belongs to")
        if not classes:
            raise _fail(tree.source, "none of the classes is a leaf of the tree")
        keep = set(classes)
        # an internal node stays when some class lies under it
        below: dict[str, bool] = {}
        for node in reversed(tree.order):
            below[node] = node in keep if node not in tree.children else any(below[k] for k in tree.children[node])
        self.internal = [n for n in tree.order if n in tree.children and below[n]]  # root first
        self.classes = list(classes)
        self.names = self.classes + self.internal[1:]
        index = {n: i for i, n in enumerate(self.names)}
        self.n_classes = len(classes)
        # per internal node, its remaining children as indices into names
        self.children = [[index[k] for k in tree.children[n] if below[k]] for n in self.internal]
        inner = {n: i for i, n in enumerate(self.internal)}
        self.parent = [inner[tree.parent[n]] if n != tree.root else -1 for n in self.internal]
        # sublabels[c, i]: which child of internal node i class c lies under (-1: not under it)
        sub = torch.full((self.n_classes, len(self.internal)), -1, dtype=torch.long)
        for c, leaf in enumerate(self.classes):
            node = leaf
            while node != tree.root:
                up = tree.parent[node]
                sub[c, inner[up]] = self.children[inner[up]].index(index[node])
                node = up
        self.sublabels = sub
        # the internal node each name is (-1 for classes), and each name's parent internal node
        self.internal_of = [-1] * self.n_classes + list(range(1, len(self.internal)))
        self.parent_of = [inner[tree.parent[n]] for n in self.names]

    def cut(self, expanded: torch.Tensor) -> TreeCut:
        """The label set of expanding the internal nodes where ``expanded`` [I] is true; the root
        is always expanded and a node under a collapsed node is collapsed."""
        open_ = [bool(v) for v in expanded.tolist()]
        open_[0] = True
        for i in range(1, len(open_)):  # pre-order: a parent is settled before its children
            open_[i] = open_[i] and open_[self.parent[i]]
        labels = [j for j, name in enumerate(self.names)
                  if open_[self.parent_of[j]] and not (self.internal_of[j] >= 0 and open_[self.internal_of[j]])]
        position = {j: p for p, j in enumerate(labels)}
        mapping = []
        for c in range(self.n_classes):
            j = c
            while j not in position:  # climb to the label that covers the class (never the root)
                j = self.n_classes + self.parent_of[j] - 1
            mapping.append(position[j])
        return TreeCut(torch.tensor(labels, dtype=torch.long), torch.tensor(mapping, dtype=torch.long))

    def random_cut(self, collapse: float, generator: Optional[torch.Generator] = None) -> TreeCut:
        """A cut with every internal node kept expanded with probability 1 − ``collapse``
        (ProTeCt's dropout over the nodes)."""
        keep = torch.rand(len(self.internal), generator=generator) >= collapse
        return self.cut(keep)

    def evaluation_cuts(self, n: int = EVAL_CUTS, rates: Sequence[float] = EVAL_CUT_RATES,
                        seed: int = 0, tries: int = 1000) -> list[TreeCut]:
        """``n`` distinct cuts, an equal share drawn at each collapse rate (seeded, so every run
        and method is scored on the same cuts). A small tree has fewer distinct cuts than asked:
        each rate then stops after ``tries`` draws without a new one."""
        gen = torch.Generator().manual_seed(seed)
        found: dict[tuple[int, ...], TreeCut] = {}
        share = -(-n // len(rates))
        for rate in rates:
            got, misses = 0, 0
            while got < share and misses < tries and len(found) < n:
                cut = self.random_cut(rate, gen)
                if cut.key() in found:
                    misses += 1
                    continue
                found[cut.key()] = cut
                got += 1
        return list(found.values())
