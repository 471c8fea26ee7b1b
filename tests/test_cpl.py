"""CPL: CoCoOp plus counterfactual image features at training time.

Pinned: λ = 0 and u-weight 0 is CoCoOp (logits, loss, one SGD step); prediction is CoCoOp's;
the mixing formula, ``mupdate``'s clamp and the contrastive term on hand-computed cases; the
vectorised greedy search against a per-dimension loop written from ``get_next_edit`` / ``solver``
(its fall-back to the last dimension included); the batch loss as the mean of the original's
batch-1 losses; the code's scalar mix (``first_dim``) leaving the constant log 2; the most
similar class from CLIP text cosine and from passed tables; the stored negative's feature; and
the bad-input messages.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adapt.data.items import Item
from adapt.methods import build_method
from adapt.methods.base import items_of_classes, zero_shot_text_features
from adapt.methods.cpl import contrastive_term, counterfactual, greedy_edit_mask, mixing_weights
from tests.conftest import CLASSES

TEMPLATE = ["a photo of a {}."]


def _build(name, backbone, **cfg):
    torch.manual_seed(0)
    return build_method(name, cfg or None, backbone, CLASSES, TEMPLATE).train()


def _perturb(method, scale=0.05, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _raw_features(backbone, n=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, backbone.embed_dim, generator=gen)


# ------------------------------------------------------------------------------ neutral --------
def test_lambda_and_u_weight_zero_is_cocoops_step(tiny_backbone, tiny_datamodule):
    raw, labels = _raw_features(tiny_backbone), torch.tensor([0, 2, 3, 5])
    ends = {}
    for name, cfg in (("cocoop", {}), ("cpl", {"lam": 0.0, "u_weight": 0.0}), ("cpl", {})):
        method = _build(name, tiny_backbone, **cfg)
        if name == "cpl":
            method.setup(tiny_datamodule)
        opt = torch.optim.SGD([method.prompts.ctx, *method.meta_net.parameters()], lr=0.5)
        out = method.output(raw)
        loss = method.loss(out, labels)
        loss.backward()
        opt.step()
        ends[name, bool(cfg)] = (out.logits.detach(), loss.detach(), method.prompts.ctx.detach().clone(),
                                 [p.detach().clone() for p in method.meta_net.parameters()])
    ref, neutral, full = ends["cocoop", False], ends["cpl", True], ends["cpl", False]
    assert torch.allclose(neutral[0], ref[0], atol=1e-6) and torch.allclose(neutral[1], ref[1], atol=1e-6)
    assert torch.allclose(neutral[2], ref[2], atol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(neutral[3], ref[3]))
    # the counterfactual terms do move the step (so the comparison above can fail)
    assert full[1] > ref[1] + 1e-3
    assert (full[2] - ref[2]).abs().max() > 1e-6


def test_prediction_is_cocoops_for_the_same_parameters(tiny_backbone, tiny_datamodule):
    cocoop, cpl = _build("cocoop", tiny_backbone), _build("cpl", tiny_backbone)
    _perturb(cocoop)
    with torch.no_grad():
        cpl.prompts.ctx.copy_(cocoop.prompts.ctx)
        for a, b in zip(cpl.meta_net.parameters(), cocoop.meta_net.parameters()):
            a.copy_(b)
        cpl.u_theta.mul_(-3.0)  # u_θ never enters a prediction
    cpl.setup(tiny_datamodule)
    images = torch.randn(3, 3, 32, 32)
    cocoop.eval(), cpl.eval()
    with torch.no_grad():
        ref = cocoop.predict(images)
        assert (cpl.predict(images) - ref).abs().max() <= 1e-6
        cpl.train()
        assert (cpl.output(images).logits - ref).abs().max() <= 1e-6  # the training logits too


# ------------------------------------------------------------------------------ formulas -------
def test_counterfactual_mixes_per_dimension_or_with_the_codes_scalar():
    x, x_neg = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    u = torch.tensor([[0.5, 1.0, 0.0]])
    # (1 − u) ⊙ x + u ⊙ x⁻ = (0.5, 1, 0) → normalized
    assert torch.allclose(counterfactual(x, x_neg, u), torch.tensor([[1.0, 2.0, 0.0]]) / math.sqrt(5))
    # the original's batch-1 broadcast: the scalar u[0] for every dimension: (0.5, 0.5, 0) → normalized
    assert torch.allclose(counterfactual(x, x_neg, u, "first_dim"), torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2))


def test_mixing_weights_are_mupdates_clamp():
    u_star = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    u_theta = torch.tensor([[1.0, 1.0, -5.0, 2000.0]])
    got = mixing_weights(u_star, u_theta, 0.999)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0, 0.994, 1.0]]), atol=1e-6)


def test_contrastive_term_by_hand():
    x, x_cf = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # two classes: cos (1, 0) and (0.6, 0.8)
    # −log softmax([p, n])_0 = log(1 + e^(n − p)); the mean over the two classes
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.2))) / 2
    assert contrastive_term(text, x, x_cf).item() == pytest.approx(expected, abs=1e-6)
    assert contrastive_term(text, x, x).item() == pytest.approx(math.log(2), abs=1e-6)


def _greedy_loop(x, x_neg, t_true, t_neg):
    """The original's search for one sample, a dimension at a time with explicit normalization
    (``get_next_edit``: first strictly best score above 0, else index −1; ``solver``: stop once
    the negative class scores higher)."""
    x = x.clone().double()
    x_neg, t_true, t_neg = x_neg.double(), t_true.double(), t_neg.double()
    d, chosen = len(x), []
    for _ in range(d):
        best, edit = 0.0, -1
        for i in range(d):
            if i in chosen:
                continue
            trial = x.clone()
            trial[i] = x_neg[i]
            s = float(F.normalize(trial, dim=0) @ t_neg)
            if s > best:
                best, edit = s, i
        chosen.append(edit)
        x[edit] = x_neg[edit]
        xh = F.normalize(x, dim=0)
        if float(xh @ t_neg) > float(xh @ t_true):
            break
    u = -torch.ones(d)
    u[chosen] = 1.0
    return u


def test_greedy_search_by_hand():
    # swap 0 → (0, 0.5, 0): x̂·t⁻ = 1; swap 1 → (2, 1, 0): 1/√5; swap 2 → (2, 0.5, 1): 0.7/√5.25.
    # after swapping 0 the negative wins (1 > 0): u* = (1, −1, −1)
    x, x_neg = torch.tensor([[2.0, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    t_true, t_neg = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.2]])
    assert greedy_edit_mask(x, x_neg, t_true, t_neg).tolist() == [[1.0, -1.0, -1.0]]
    # no swap scores above 0: the original's edit = −1 swaps the last dimension, every step
    x, x_neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    u = greedy_edit_mask(x, x_neg, torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, -1.0]]))
    assert u.tolist() == [[-1.0, 1.0]]
    assert _greedy_loop(x[0], x_neg[0], torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0])).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_search_equals_the_per_dimension_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    b, d = 5, 12
    x, x_neg = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    t_true, t_neg = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    got = greedy_edit_mask(x, x_neg, t_true, t_neg)
    ref = torch.stack([_greedy_loop(*(t[i] for t in (x, x_neg, t_true, t_neg))) for i in range(b)])
    assert torch.equal(got, ref)
    assert (got > 0).sum(-1).min() >= 1  # at least one dimension is always swapped


def test_batch_loss_is_the_mean_of_the_originals_batch_one_losses(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone, lam=2.0, u_weight=0.5)
    _perturb(method)
    method.setup(tiny_datamodule)
    raw, labels = _raw_features(tiny_backbone), torch.tensor([1, 1, 4, 0])
    with torch.no_grad():
        batch = method.loss(method.output(raw), labels)
        singles = []
        for i in range(len(labels)):  # CustomCLIP.forward at batch 1: CE + λ·xloss.mean() + w·‖u_y‖
            out = method.output(raw[i:i + 1])
            y = labels[i:i + 1]
            neg = method.neighbour[y]
            x_neg = method.negative_features[neg]
            u_star = greedy_edit_mask(raw[i:i + 1], x_neg, method.name_features[y], method.name_features[neg])
            u = torch.clamp(0.999 * u_star + 0.001 * method.u_theta[y], 0, 1)
            x = F.normalize(raw[i:i + 1], dim=-1)
            x_cf = F.normalize((1 - u) * x + u * F.normalize(x_neg, dim=-1), dim=-1)
            text = out.tensors["text_features"][0]
            pos, negs = text @ x[0], text @ x_cf[0]
            xloss = -torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(negs)))
            singles.append(F.cross_entropy(out.logits, y) + 2.0 * xloss.mean() + 0.5 * u.norm())
    assert batch.item() == pytest.approx(torch.stack(singles).mean().item(), abs=1e-5)


def test_the_codes_scalar_mix_leaves_log_two_when_dimension_zero_is_kept(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone, mix="first_dim", u_weight=0.0)
    method.setup(tiny_datamodule)
    raw, labels = _raw_features(tiny_backbone, n=8, seed=11), torch.arange(8) % 6
    neg = method.neighbour[labels]
    u_star = greedy_edit_mask(raw, method.negative_features[neg], method.name_features[labels],
                              method.name_features[neg])
    kept = u_star[:, 0] < 0
    assert kept.any()
    out = method.output(raw[kept])
    method.loss(out, labels[kept])
    assert out.scalars["cf"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_u_theta_learns_only_on_the_swapped_dimensions_of_the_batchs_classes(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone)
    method.setup(tiny_datamodule)
    raw, labels = _raw_features(tiny_backbone), torch.tensor([0, 0, 2, 3])
    method.loss(method.output(raw), labels).backward()
    # at its initial ones, u = 0.999 + 0.001 is exactly the clamp's bound, where torch passes no
    # gradient: u_θ starts to learn once weight decay has moved it below 1
    assert method.u_theta.grad.abs().max() == 0
    method.u_theta.grad = None
    with torch.no_grad():
        method.u_theta.fill_(0.5)
    method.loss(method.output(raw), labels).backward()
    grad = method.u_theta.grad
    assert grad[[1, 4, 5]].abs().max() == 0 and grad[[0, 2, 3]].abs().max() > 0
    neg = method.neighbour[labels]
    u_star = greedy_edit_mask(raw, method.negative_features[neg], method.name_features[labels],
                              method.name_features[neg])
    assert grad[2][u_star[2] < 0].abs().max() == 0  # clamped to 0 there: no gradient


# ------------------------------------------------------------------------------ similarity -----
def test_most_similar_class_from_clip_text_cosine(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone)
    method.setup(tiny_datamodule)
    text = zero_shot_text_features(tiny_backbone, CLASSES, TEMPLATE)
    sim = text @ text.t()
    sim.fill_diagonal_(-2.0)
    expected = {c: CLASSES[int(sim[i].argmax())] for i, c in enumerate(CLASSES)}
    assert method.neighbours() == expected
    assert all(k != v for k, v in expected.items())


def test_the_stored_negative_is_the_first_training_item_of_its_class(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone)
    method.setup(tiny_datamodule)
    dm = tiny_datamodule
    items = items_of_classes(dm.train_items, dm.train_classnames, CLASSES)
    for c in sorted(set(method.neighbour.tolist())):
        first = next(it for it in items if it.label == c)
        image = dm.dataloader([first], dm.test_transform(), 1).dataset[0][0]
        with torch.no_grad():
            feat = tiny_backbone.encode_image(image.unsqueeze(0), normalize=False)[0]
        assert torch.allclose(method.negative_features[c], feat, atol=1e-5)


def test_a_passed_table_sets_the_negatives(tiny_backbone, tiny_datamodule, tmp_path):
    mapping = {"red": "purple", "green": "cyan", "blue": "cyan", "yellow": "red", "purple": "blue",
               "Cyan": "green", "magenta": "nothing"}  # extra rows are ignored; names match case-free
    path = tmp_path / "table.json"
    path.write_text(json.dumps(mapping))
    method = _build("cpl", tiny_backbone, similarity=str(path))
    method.setup(tiny_datamodule)
    assert method.neighbours() == {**{k: v for k, v in mapping.items() if k in CLASSES}, "cyan": "green"}
    # a CSV with a header row gives the same
    csv = tmp_path / "table.csv"
    csv.write_text("class,most_similar\n" + "".join(f"{k},{v}\n" for k, v in mapping.items() if k != "magenta"))
    method = _build("cpl", tiny_backbone, similarity=str(csv))
    method.setup(tiny_datamodule)
    assert method.neighbours()["red"] == "purple" and method.neighbours()["cyan"] == "green"


def test_a_passed_matrix_gives_the_best_other_class_among_the_methods(tiny_backbone, tiny_datamodule, tmp_path):
    names = CLASSES + ["magenta"]
    scores = [[0.0] * len(names) for _ in names]
    for i in range(len(names)):
        scores[i][i] = 1.0                       # the diagonal is never chosen
        scores[i][(i + 2) % len(names)] = 0.5    # the best other class
        scores[i][6] = 0.9 if i != 6 else 1.0    # magenta beats it, but the method has no magenta
    path = tmp_path / "matrix.csv"
    path.write_text("," + ",".join(names) + "\n" + "".join(
        n + "," + ",".join(str(v) for v in row) + "\n" for n, row in zip(names, scores)))
    method = _build("cpl", tiny_backbone, similarity=str(path))
    method.setup(tiny_datamodule)
    # (i + 2) % 7 is magenta for purple: then the first of its tied zeros that is not itself (red)
    assert method.neighbours() == {"red": "blue", "green": "yellow", "blue": "purple", "yellow": "cyan",
                                   "purple": "red", "cyan": "red"}
    js = tmp_path / "matrix.json"
    js.write_text(json.dumps({"classnames": names, "scores": scores}))
    other = _build("cpl", tiny_backbone, similarity=str(js))
    other.setup(tiny_datamodule)
    assert other.neighbours() == method.neighbours()


# ------------------------------------------------------------------------------ bad input ------
def test_a_table_naming_unknown_or_missing_classes_is_refused_naming_them(tiny_backbone, tiny_datamodule, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"red": "crimson", "green": "green", "blue": "red", "yellow": "red",
                                "purple": "red"}))
    method = _build("cpl", tiny_backbone, similarity=str(path))
    with pytest.raises(ValueError) as err:
        method.setup(tiny_datamodule)
    msg = str(err.value)
    assert "no entry for 1 class(es): cyan" in msg
    assert "not among the 6 training classes: crimson" in msg
    assert "own most similar: green" in msg
    assert "fix the file" in msg
    csv = tmp_path / "twice.csv"
    csv.write_text("".join(f"{c},{CLASSES[(i + 1) % 6]}\n" for i, c in enumerate(CLASSES)) + "red,blue\n")
    with pytest.raises(ValueError, match="'red' is listed twice"):
        _build("cpl", tiny_backbone, similarity=str(csv)).setup(tiny_datamodule)


@pytest.mark.parametrize("text,problem", [
    ("[1, 2]", "cannot read .* expected"),
    ('{"classnames": ["red", "green"], "scores": [[1, 0]]}', "must be square"),
    ("{not json", "cannot read"),
])
def test_an_unreadable_table_is_refused(tiny_backbone, tiny_datamodule, tmp_path, text, problem):
    path = tmp_path / "t.json"
    path.write_text(text)
    method = _build("cpl", tiny_backbone, similarity=str(path))
    with pytest.raises(ValueError, match=problem):
        method.setup(tiny_datamodule)


def test_a_missing_file_and_a_wrong_suffix_are_refused(tiny_backbone, tiny_datamodule, tmp_path):
    with pytest.raises(ValueError, match="give a .json or .csv file"):
        _build("cpl", tiny_backbone, similarity=str(tmp_path / "t.npy"))
    method = _build("cpl", tiny_backbone, similarity=str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="is not a file"):
        method.setup(tiny_datamodule)


def test_a_similar_class_without_a_training_image_is_refused(tiny_backbone, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({c: ("blue" if c != "blue" else "red") for c in CLASSES}))
    items = [Item(f"{c}/0.png", i) for i, c in enumerate(CLASSES) if c != "blue"]
    dm = SimpleNamespace(train_items=items, train_classnames=CLASSES)
    method = _build("cpl", tiny_backbone, similarity=str(path))
    with pytest.raises(ValueError, match=r"no training image .*: blue \(for red, green, yellow, purple, cyan\)"):
        method.setup(dm)


def test_loss_before_setup_and_after_repointing_is_refused(tiny_backbone, tiny_datamodule):
    method = _build("cpl", tiny_backbone)
    raw, labels = _raw_features(tiny_backbone), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="needs setup"):
        method.loss(method.output(raw), labels)
    method.set_classnames(CLASSES[:3])
    with pytest.raises(ValueError, match="build a new cpl"):
        method.setup(tiny_datamodule)


@pytest.mark.parametrize("cfg,match", [({"mix": "scalar"}, "mix="), ({"lam": -1.0}, "lam and u_weight"),
                                       ({"u_momentum": 1.5}, "u_momentum")])
def test_bad_config_values_are_refused(tiny_backbone, cfg, match):
    with pytest.raises(ValueError, match=match):
        _build("cpl", tiny_backbone, **cfg)


# ------------------------------------------------------------------------------ runs -----------
def test_base_to_novel_run_trains_on_base_negatives_and_predicts_novel(image_folder, tmp_path):
    from pathlib import Path

    from adapt.config import load_recipe
    from adapt.run import run_fit
    from tests.conftest import tiny_overrides

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    over = tiny_overrides(image_folder, tmp_path, "cpl", **{
        "trainer.max_epochs": 1, "data.cache_dir": str(tmp_path / "features"), "run_name": "b2n"})
    recipe = load_recipe(recipes / "cpl" / "base2novel.yaml", over)
    assert (recipe.method.lam, recipe.method.u_weight, recipe.method.mix) == (1.0, 0.07, "mask")
    results = run_fit(recipe)
    assert set(results["metrics"]) == {"base_acc", "novel_acc", "hm"}
    assert results["classes"] == {"base": 3, "novel": 3}
    assert {"ce", "cf", "unorm", "edits"} <= set(results["scalars"])
    assert results["scalars"]["cf"] > 0 and results["scalars"]["edits"] >= 1
