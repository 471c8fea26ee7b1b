"""Task kinds: their losses and metrics against the originals' computations, written out here
the way the originals loop (DualCoOp's utils/helper.py and validations.py, TaI-DPT's ranking loss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapt.tasks import get_task, list_tasks
from adapt.tasks.losses import asymmetric_loss, ranking_loss
from adapt.tasks.metrics import mean_average_precision, threshold_scores, topk_scores


def _data(n=30, k=5, seed=0, unknown=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, k, generator=g)
    targets = (torch.rand(n, k, generator=g) < 0.4).long()
    if unknown:
        targets[torch.rand(n, k, generator=g) < 0.2] = -1
    return scores, targets


def _ap_loop(scores, targets):
    """Non-interpolated AP the way DualCoOp's average_precision loops (numpy, high to low)."""
    aps = []
    for k in range(scores.shape[1]):
        order = np.argsort(-scores[:, k], kind="stable")
        hits, total, s = 0, int((targets[:, k] == 1).sum()), 0.0
        for i, j in enumerate(order, start=1):
            if targets[j, k] == 1:
                hits += 1
                s += hits / i
        aps.append(s / (total + 1e-8))
    return 100 * float(np.mean(aps))


def test_registry_names_and_refuses_unknown_tasks():
    assert {"single_label", "multi_label"} <= set(list_tasks())
    with pytest.raises(KeyError, match="Did you mean 'multi_label'"):
        get_task("multilabel")


@pytest.mark.parametrize("unknown", [False, True])
def test_map_is_the_originals_average_precision(unknown):
    scores, targets = _data(unknown=unknown)
    assert mean_average_precision(scores, targets) == pytest.approx(_ap_loop(scores.numpy(), targets.numpy()), abs=1e-9)
    # a perfect ranking scores 100; unknown entries can be left out of each class's ranking
    assert mean_average_precision(targets.float(), targets) == pytest.approx(100.0, abs=1e-4)
    if unknown:
        kept = mean_average_precision(scores, targets, ignore_unknown=True)
        ref = np.mean([_ap_loop(scores[targets[:, k] != -1, k:k + 1].numpy(),
                                targets[targets[:, k] != -1, k:k + 1].numpy()) for k in range(5)])
        assert kept == pytest.approx(ref, abs=1e-9)


def test_threshold_scores_are_the_originals_cp_cr_of():
    scores, targets = _data(seed=2)
    got = threshold_scores(scores, targets, 0.5)
    pred, t = (scores > 0.5).long(), targets
    tp = ((pred + t) == 2).sum(0).float()
    fp = ((pred - t) == 1).sum(0).float()
    fn = ((pred - t) == -1).sum(0).float()
    p_c = [float(tp[i] / (tp[i] + fp[i])) * 100 if tp[i] > 0 else 0.0 for i in range(5)]
    r_c = [float(tp[i] / (tp[i] + fn[i])) * 100 if tp[i] > 0 else 0.0 for i in range(5)]
    f_c = [2 * p_c[i] * r_c[i] / (p_c[i] + r_c[i]) if tp[i] > 0 else 0.0 for i in range(5)]
    p_o = float(tp.sum() / (tp + fp).sum()) * 100
    r_o = float(tp.sum() / (tp + fn).sum()) * 100
    ref = {"cp": np.mean(p_c), "cr": np.mean(r_c), "cf1": np.mean(f_c), "op": p_o, "or": r_o,
           "of1": 2 * p_o * r_o / (p_o + r_o)}
    assert got == pytest.approx(ref, abs=1e-5)


def test_topk_scores_pool_over_the_split():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.9, 0.3]])
    targets = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0]])
    got = topk_scores(scores, targets, k=2)
    # image 0: top {0, 1} -> 1 tp, 1 fp, misses 2; image 1: top {2, 3} -> 1 tp, 1 fp
    assert got == pytest.approx({"p@2": 50.0, "r@2": 100 * 2 / 3, "f1@2": 100 * 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)})


def _asl_original(x, y, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-6):
    """DualCoOp's AsymmetricLoss.forward on [N, 2, K] logits, step by step."""
    sm = F.softmax(x, dim=1)
    xs_pos, xs_neg, y = sm[:, 1, :].reshape(-1), sm[:, 0, :].reshape(-1), y.reshape(-1).float()
    xs_pos, xs_neg, y = xs_pos[y != -1], xs_neg[y != -1], y[y != -1]
    xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    with torch.no_grad():
        pt = xs_pos * y + xs_neg * (1 - y)
        w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * w).sum()


def test_asymmetric_loss_is_dualcoops_with_unknowns_dropped():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 7, generator=g, requires_grad=True)
    _, y = _data(6, 7, seed=5, unknown=True)
    ours, ref = asymmetric_loss(x, y, gamma_neg=2), _asl_original(x, y, gamma_neg=2)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(ref, x)
    assert torch.allclose(g1, g2, atol=1e-6)
    # [N, K] logits: the same loss with p = sigmoid(l), i.e. DualCoOp's pair (0, l)
    flat = torch.randn(6, 7, generator=g)
    pair = torch.stack([torch.zeros_like(flat), flat], dim=1)
    assert float(asymmetric_loss(flat, y)) == pytest.approx(float(_asl_original(pair, y)), rel=1e-6)
    # an unknown entry contributes nothing, whatever its logit
    moved = flat.clone()
    moved[y == -1] += 100
    assert float(asymmetric_loss(moved, y)) == pytest.approx(float(asymmetric_loss(flat, y)), rel=1e-6)


def test_ranking_loss_is_taidpts_pairwise_hinge():
    scores, targets = _data(8, 6, seed=7)
    scores = 3 * scores - 1
    got = ranking_loss(scores, targets, margin=1.0, scale=2.0)
    total = 0.0
    for b in range(8):
        for i in range(6):
            for j in range(6):
                if targets[b, i] == 1 and targets[b, j] == 0:
                    total += max(0.0, 1.0 - 2 * float(scores[b, i]) + 2 * float(scores[b, j]))
    assert float(got) == pytest.approx(total / 8, rel=1e-6)


def test_task_objects_give_their_loss_and_metrics():
    single, multi = get_task("single_label"), get_task("multi_label")
    logits, labels = torch.randn(10, 4), torch.randint(0, 4, (10,))
    assert float(single.loss(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels)))
    ev = single.evaluator(4)
    ev.update(logits[:5], labels[:5])
    ev.update(logits[5:], labels[5:])
    assert ev.compute() == {"acc": pytest.approx(float((logits.argmax(1) == labels).float().mean()))}
    scores, targets = _data(12, 4, seed=9)
    logit = torch.logit(scores)
    ev = multi.evaluator(4)
    ev.update(logit[:6], targets[:6])
    ev.update(logit[6:], targets[6:])
    out = ev.compute()
    assert 100 * out["map"] == pytest.approx(mean_average_precision(scores, targets), abs=1e-4)
    assert 100 * out["of1"] == pytest.approx(threshold_scores(scores, targets)["of1"], abs=1e-4)
    assert {single.primary, multi.primary} == {"acc", "map"} and "p@3" in out


def test_multi_label_evaluator_ranks_margins_where_float32_probabilities_tie():
    """CLIP's 100·cos logits reach 20-35, where σ rounds to exactly 1 in float32: ranking those
    probabilities would tie every class. The evaluator ranks the logit itself (σ's order)."""
    from adapt.tasks import get_task

    g = torch.Generator().manual_seed(0)
    logits = 20 + 15 * torch.rand(64, 5, generator=g)
    targets = (torch.rand(64, 5, generator=g) < 0.4).long()
    assert bool((torch.sigmoid(logits) == 1).all())  # the float32 probabilities are all ties
    ev = get_task("multi_label").evaluator(5)
    ev.update(logits, targets)
    out = ev.compute()
    assert 100 * out["map"] == pytest.approx(mean_average_precision(logits, targets))
    assert 100 * out["map"] != pytest.approx(mean_average_precision(torch.sigmoid(logits), targets))
    # DualCoOp's [N, 2, K]: the margin l+ - l- ranks as the softmax's positive probability
    pair = torch.stack([torch.zeros_like(logits), logits - 27], 1)
    ev = get_task("multi_label").evaluator(5)
    ev.update(pair, targets)
    probs = torch.softmax(pair.double(), 1)[:, 1]
    both = ev.compute()
    assert 100 * both["map"] == pytest.approx(mean_average_precision(probs, targets))
    assert 100 * both["cf1"] == pytest.approx(threshold_scores(probs, targets)["cf1"])
