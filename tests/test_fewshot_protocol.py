"""The few-shot sample equals the CoOp/Dassl code's for the same seed and K, and the settings
built on it (base/novel rule, relabelling)."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest

from adapt.settings import check_data
from adapt.data import DataConfig, DatasetSplits, Item, few_shot_splits
from adapt.settings import get_setting

# label order in the train list is 3, 0, 2, 4, 1 (not sorted), with items of each label scattered
LABEL_ORDER = [3, 0, 2, 4, 1]


def hand_written_split(n_train: int = 7, n_val: int = 5) -> DatasetSplits:
    def split(name: str, n: int) -> list[Item]:
        items = []
        for i in range(n):
            for label in LABEL_ORDER:
                items.append(Item(f"{name}/{label}_{i}.jpg", label))
        random.Random(42).shuffle(items[len(LABEL_ORDER):])  # first appearance order stays 3,0,2,4,1
        return items
    return DatasetSplits("toy", Path("."), [f"class{c}" for c in range(5)], ["a photo of a {}."],
                         train=split("train", n_train), val=split("val", n_val), test=split("test", 3))


def protocol_reference(train, val, k: int, seed: int):
    """The protocol's rules as the original code applies them: the global ``random`` seeded once
    (Dassl's set_random_seed), labels in first-appearance order (a defaultdict filled in list
    order), random.sample per label, then the validation draw with min(K, 4) on the same stream."""
    state = random.getstate()
    try:
        random.seed(seed)

        def draw(items, n):
            tracker = defaultdict(list)
            for it in items:
                tracker[it.label].append(it)
            out = []
            for _, group in tracker.items():
                out.extend(random.sample(group, n) if len(group) >= n else group)
            return out
        return draw(train, k), draw(val, min(k, 4))
    finally:
        random.setstate(state)


def test_split_has_unsorted_first_appearance_order():
    ds = hand_written_split()
    first = list(dict.fromkeys(it.label for it in ds.train))
    assert first == LABEL_ORDER != sorted(LABEL_ORDER)


@pytest.mark.parametrize("k,seed", [(1, 1), (4, 2), (5, 3), (16, 1)])
def test_train_and_val_equal_the_protocol_reference(k, seed):
    ds = hand_written_split()
    train, val = few_shot_splits(ds, k, seed, allow_fewer=True)
    ref_train, ref_val = protocol_reference(ds.train, ds.val, k, seed)
    assert train == ref_train  # same items, same order
    assert val == ref_val


def test_reference_discriminates_the_two_known_departures():
    """Sorted label order or a fresh stream for val would give other images: the equality above
    would fail for either mistake."""
    ds = hand_written_split()
    ref_train, ref_val = protocol_reference(ds.train, ds.val, 4, 1)
    rng = random.Random(1)
    by_label = defaultdict(list)
    for it in ds.train:
        by_label[it.label].append(it)
    sorted_train = [x for label in sorted(by_label) for x in rng.sample(by_label[label], 4)]
    assert set(sorted_train) != set(ref_train)
    fresh_val, _ = protocol_reference(ds.val, [], 4, 1)  # val drawn from a freshly seeded stream
    assert set(fresh_val) != set(ref_val)


def test_same_seed_same_sample_other_seed_other_sample_and_global_rng_untouched():
    ds = hand_written_split()
    random.seed(0)
    before = random.random()
    random.seed(0)
    a = few_shot_splits(ds, 4, 1)
    assert random.random() == before  # a private stream: the global RNG is not consumed
    assert few_shot_splits(ds, 4, 1) == a
    b = few_shot_splits(ds, 4, 2)
    assert set(b[0]) != set(a[0]) and set(b[1]) != set(a[1])


def test_base2novel_samples_all_classes_first_then_relabels_the_base_half():
    ds = hand_written_split()
    cfg = DataConfig(dataset="toy", shots=4, setting="base2novel")
    plan = get_setting("base2novel").plan(cfg, ds, seed=1)
    all_train, all_val = protocol_reference(ds.train, ds.val, 4, 1)
    # base = labels 0, 1, 2 (ceil(5/2) = 3), kept in the sample's order, relabelled 0..2
    assert plan.train == [it for it in all_train if it.label < 3]
    assert plan.val == [it for it in all_val if it.label < 3]
    assert plan.sample_train == all_train  # the manifest holds the sample over all classes
    assert plan.train_classnames == ["class0", "class1", "class2"]
    assert list(plan.eval_sets) == ["base", "novel"]
    novel_names, novel_items = plan.eval_sets["novel"]
    assert novel_names == ["class3", "class4"]
    assert sorted({it.label for it in novel_items}) == [0, 1]
    assert {Item(it.path, it.label + 3) for it in novel_items} == {it for it in ds.test if it.label >= 3}
    assert get_setting("base2novel").summarize({"base": 80.0, "novel": 60.0})["hm"] == pytest.approx(2 * 80 * 60 / 140)


def test_supervised_is_all_setting_with_zero_shots():
    ds = hand_written_split()
    plan = get_setting("all").plan(DataConfig(dataset="toy", shots=0), ds, seed=1)
    assert plan.train == ds.train and plan.val == ds.val
    assert list(plan.eval_sets) == ["test"]


def test_unknown_setting_names_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'base2novel'"):
        check_data(DataConfig(setting="base2noval"))
