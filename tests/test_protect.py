"""ProTeCt: CoOp / MaPLe prompts trained on a random tree cut's labels and on every node's children.

Pinned: one pass scores every tree name exactly as the base method pointed at those names alone
(what the original computes per node and per cut); prediction is the base method's over the
classes; with nothing collapsed and λ = 0 the step is the base method's CE step; the node loss
and the cut loss on hand-computed cases; the cut is drawn from the seeded generator; the
recipes' settings; and, with a checkout of gina9726/ProTeCt named by ``ADAPT_PROTECT_REPO``,
one step of its own ``train_one_epoch`` (loss and gradient, cuts forced through its generator)
and its ``eval_one_epoch``'s consistency (HCA).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.config import load_recipe
from adapt.tasks.hierarchy import ClassTree
from adapt.methods import build_method
from adapt.methods.protect import node_loss, tree_cut_loss
from adapt.tasks import get_task
from adapt.tasks.hierarchy_metrics import HierarchicalAccuracy
from tests.conftest import CLASSES, COLOUR_TREE

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATE = ["a photo of a {}."]
TREE_TASK = get_task("single_label", hierarchy=str(COLOUR_TREE))


def _pair(backbone, base: str, **cfg):
    """ProTeCt over ``base`` and the base method itself with the same initial parameters."""
    torch.manual_seed(0)
    protect = build_method("protect" if base == "coop" else "protect_maple", cfg or None, backbone, CLASSES,
                           TEMPLATE, task=TREE_TASK)
    plain = {k: v for k, v in cfg.items() if k not in ("lam", "collapse")}
    torch.manual_seed(0)
    other = build_method(base, plain or None, backbone, CLASSES, TEMPLATE)
    other.load_state_dict(protect.state_dict(), strict=False)
    return protect, other


@pytest.mark.parametrize("base", ["coop", "maple"])
def test_one_pass_scores_each_name_as_the_base_method_pointed_at_it(tiny_backbone, base):
    protect, other = _pair(tiny_backbone, base)
    protect.train()
    images = torch.randn(3, 3, 32, 32)
    out = protect.output(images)
    names = TREE_TASK.tree.over(CLASSES).names  # the six classes, then warm, cool, greenish
    assert out.tensors["tree_logits"].shape == (3, len(names))
    other.eval()
    with torch.no_grad():
        other.set_classnames(["cool", "warm", "blue"])  # a node's labels, pointed at alone
        alone = other(images)
        assert torch.allclose(out.tensors["tree_logits"][:, [7, 6, 2]], alone, atol=1e-5)
        other.set_classnames(CLASSES)
        protect.eval()
        assert torch.allclose(protect(images), other(images), atol=1e-6)  # prediction: the base's, classes only
        assert torch.equal(out.logits, out.tensors["tree_logits"][:, :6])


@pytest.mark.parametrize("base", ["coop", "maple"])
def test_nothing_collapsed_and_lambda_zero_is_the_base_methods_step(tiny_backbone, base):
    protect, other = _pair(tiny_backbone, base, lam=0.0, collapse=0.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 1])
    for m in (protect.train(), other.train()):
        m.loss(m.output(images), labels).backward()
    a = [p.grad for p in protect.trainable_parameters()]
    b = [p.grad for p in other.trainable_parameters()]
    # the same step up to the round-off of encoding nine names instead of six in one batch
    assert len(a) == len(b) and all((x - y).abs().max() <= 1e-5 * y.abs().max() for x, y in zip(a, b))
    assert any(x.abs().sum() > 0 for x in a)


def test_node_loss_by_hand():
    view = ClassTree({"r": ["a", "b"], "a": ["x", "y"], "b": ["z"]}).over(["x", "y", "z"])  # x y z a b
    logits = torch.tensor([[2., 0., 1., 0.5, -1.], [0., 1., 3., 2., 0.]])
    labels = torch.tensor([0, 1])  # both under a
    root = F.cross_entropy(logits[:, [3, 4]], torch.tensor([0, 0]))
    at_a = F.cross_entropy(logits[:, [0, 1]], torch.tensor([0, 1]))
    assert torch.allclose(node_loss(logits, labels, view), (root + at_a) / 2)  # b has no image: left out
    z = torch.tensor([2])
    at_b = F.cross_entropy(logits[:1, [2]], torch.tensor([0]))  # one child: zero
    assert torch.allclose(node_loss(logits[:1], z, view), (F.cross_entropy(logits[:1, [3, 4]], torch.tensor([1]))
                                                             + at_b) / 2)


def test_the_cut_loss_reads_the_seeded_cut():
    view = ClassTree({"r": ["a", "b"], "a": ["x", "y"], "b": ["z", "w"]}).over(["x", "y", "z", "w"])
    logits, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    torch.manual_seed(3)
    loss = tree_cut_loss(logits, labels, view, 0.5)
    torch.manual_seed(3)
    cut = view.random_cut(0.5)
    assert torch.allclose(loss, F.cross_entropy(logits[:, cut.labels], cut.mapping[labels]))
    seen = set()
    for s in range(40):  # at collapse 0.5 the draws reach every cut of this tree (1 + 2 x 2 = ... 4)
        torch.manual_seed(s)
        seen.add(view.random_cut(0.5).key())
    assert seen == {(0, 1, 2, 3), (0, 1, 5), (2, 3, 4), (4, 5)}
    assert torch.allclose(tree_cut_loss(logits, labels, view, 0.0), F.cross_entropy(logits[:, :4], labels))


def test_training_without_a_tree_and_bad_options_are_refused(tiny_backbone):
    bare = build_method("protect", None, tiny_backbone, CLASSES, TEMPLATE)
    with pytest.raises(ValueError, match="trains on a class tree and this data has none: set data.hierarchy"):
        bare.output(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="csc=true"):
        build_method("protect", {"csc": True}, tiny_backbone, CLASSES, TEMPLATE)
    with pytest.raises(ValueError, match="collapse"):
        build_method("protect", {"collapse": 1.0}, tiny_backbone, CLASSES, TEMPLATE)


def test_recipes_carry_the_originals_settings():
    coop = load_recipe(RECIPES / "protect/fewshot.yaml", ["data.hierarchy=t.json"])
    assert (coop.method.n_ctx, coop.method.ctx_init, coop.method.lam, coop.method.collapse) == (16, "", 1.0, 0.1)
    assert (coop.optim.lr, coop.optim.momentum, coop.optim.weight_decay) == (0.02, 0.0, 0.0)
    assert (coop.data.batch_size, coop.trainer.max_epochs, coop.optim.warmup_lr) == (8, 30, 0.001)
    maple = load_recipe(RECIPES / "protect_maple/fewshot.yaml", ["data.hierarchy=t.json"])
    assert (maple.method.n_ctx, maple.method.depth, maple.method.ctx_init) == (2, 3, "a photo of a")
    assert (maple.data.batch_size, maple.trainer.max_epochs, maple.optim.lr) == (2, 10, 0.02)


# ------------------------------------------------------------------ the original's own code ------
@pytest.mark.skipif(not os.environ.get("ADAPT_PROTECT_REPO"),
                    reason="set ADAPT_PROTECT_REPO to a checkout of gina9726/ProTeCt")
def test_losses_and_hca_equal_the_originals_train_and_eval_epochs(tmp_path, monkeypatch):
    """One step of the original's ``train_one_epoch`` (its cut generator, sublabels, node loop and
    loss) on a stand-in model that scores any name list, against ProTeCt's losses here on the
    same logits, for cuts forced through its generator; and its ``eval_one_epoch``'s
    consistency against ``hca``. The original's CUDA calls run on the CPU; pandas (used to index
    name lists) and termcolor (printing) are replaced by stand-ins."""
    import importlib.util
    import sys
    import types

    import numpy as np

    repo = Path(os.environ["ADAPT_PROTECT_REPO"])
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # treelibs' default argument (numpy < 2)

    class _Rows:
        def __init__(self, rows):
            self.rows = list(rows)

        def __getitem__(self, idx):
            return {0: [self.rows[i] for i in np.asarray(idx).reshape(-1).tolist()]}

    pandas = types.ModuleType("pandas")
    pandas.DataFrame = lambda rows: types.SimpleNamespace(iloc=_Rows(rows))
    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *a, **k: text
    for name, module in (("pandas", pandas), ("termcolor", termcolor)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("loader", "treelibs", "engine", "metrics"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(repo / "loader"))
    monkeypatch.syspath_prepend(str(repo))
    import engine as original  # noqa: E402
    import treelibs  # noqa: E402
    from loader import hierdata  # noqa: E402
    spec = importlib.util.spec_from_file_location("treecut_generator", repo / "models" / "treecut_generator.py")
    cutgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cutgen)

    # its tree comes from a folder hierarchy; its trees are pickled treelibs objects
    folders = ["warm/reddish/red", "warm/reddish/orange", "warm/yellow", "cool/greenish/green",
               "cool/greenish/teal", "cool/greenish/lime", "cool/blue"]
    for f in folders:
        (tmp_path / "tree" / f).mkdir(parents=True)
    tree = treelibs.Tree(str(tmp_path / "tree"))
    np.save(tmp_path / "tree.npy", np.array(tree, dtype=object), allow_pickle=True)
    (tmp_path / "train.txt").write_text("")
    leaves = [tree.leaf_nodes[i] for i in range(len(tree.leaf_nodes))]  # its label order

    class _Files:  # its image list, without files: only the targets are read
        def __init__(self, root_dir, flist, transform=None, **kw):
            self.target, self.indices = list(range(len(leaves))), list(range(len(leaves)))

        def __len__(self):
            return len(self.target)

    monkeypatch.setattr(hierdata, "ImageFilelist", _Files)
    data = hierdata.HierDataLoader({"data_root": str(tmp_path / "tree"), "train": str(tmp_path / "train.txt"),
                                    "hierarchy": str(tmp_path / "tree.npy"), "n_workers": 0}, ["train"], 4)

    # the same tree here: children in its order, classes in its leaf order
    children = {n: list(node.children.values()) for n, node in tree.nodes.items() if node.children}
    view = ClassTree(children).over(leaves)
    assert view.internal == [tree.intnl_nodes[i] for i in range(len(tree.intnl_nodes))]

    torch.manual_seed(0)
    table = torch.randn(len(data["param_names"]), 6)  # one score vector per name

    class Scorer(torch.nn.Module):  # the stand-in for its CoOp: logits of images over any names
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Parameter(table.clone())
            self.row = {n: i for i, n in enumerate(data["param_names"])}

        def forward(self, image, text=None):
            names = text if text is not None else leaves
            return {"logits_per_image": 3.0 * image @ self.emb[[self.row[n] for n in names]].t()}

    images = torch.randn(9, 6)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 5]) % len(leaves)
    loader = type("Loader", (), {"dataset": types.SimpleNamespace(indices=list(range(9))),
                                 "__iter__": lambda self: iter([(images, targets, torch.arange(9))])})()
    cfg = {"print_freq": 1000, "model": {"name": "ViT-B/16"}, "data": {"sampler": {"name": "random"}},
           "loss": {"name": "ce", "lambda": 0.7}, "optim": {}}
    args = types.SimpleNamespace(debug=False)
    gen = cutgen.TreecutGenerator(**data["tree_info"], dropout_rate=0.1)
    n_int = len(view.internal)
    for expanded in ([1] * n_int, [1, 0] + [1] * (n_int - 2), [1] * (n_int - 1) + [0], [0] * n_int):
        forced = torch.tensor(expanded, dtype=torch.float)
        gen.forward = lambda p=None: forced.clone()
        theirs = Scorer()
        meters = original.train_one_epoch(theirs, torch.optim.SGD(theirs.parameters(), lr=0.0), None, loader,
                                          data["param_names"], "cpu", 0, cfg, args, gen, data["leaf_nodes"],
                                          data["intnl_nodes"], data["sublabels"])
        mask, mapping = gen.get_randomcut()
        cut = view.cut(forced.bool())
        assert sorted(data["param_names"][i] for i in torch.where(mask)[0]) == sorted(view.names[j] for j in cut.labels)
        ours = Scorer()
        scores = ours(images, view.names)["logits_per_image"]
        loss = (F.cross_entropy(scores[:, cut.labels], cut.mapping[targets]) + 0.7 * node_loss(scores, targets, view))
        assert float(loss) == pytest.approx(meters["loss"], rel=1e-6), expanded
        loss.backward()
        order = [ours.row[n] for n in data["param_names"]]
        assert torch.allclose(ours.emb.grad[order], theirs.emb.grad, atol=1e-6)

    evaluated = original.eval_one_epoch(Scorer(), loader, data["param_names"], "cpu", 0, cfg, args,
                                        data["leaf_nodes"], data["intnl_nodes"], data["sublabels"])
    metric = HierarchicalAccuracy(view, [])
    metric.update(Scorer()(images, view.names)["logits_per_image"], targets)
    found = metric.compute()
    assert 100 * found["hca"] == pytest.approx(evaluated["consistency"])
    assert 100 * found["acc"] == pytest.approx(evaluated["acc"])
