"""The feature cache (same logits as images, reuse, invalidation, atomic entries), its wiring in
the runner, and the automatic memory plan of the text tower."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adapt.fused_blocks as fused_blocks
from adapt.backbone_loading import BackboneConfig, text_memory_plan
from adapt.config import load_recipe
from adapt.data.feature_cache import (EpochViewSampler, FeatureCache, ViewDataset, encode_items,
                                      fingerprint, key_of)
from adapt.data.items import Item
from adapt.data.transforms import test_transform, train_transform
from adapt.methods import build_method
from adapt.run import Experiment, run_fit, run_test
from tests.conftest import CLASSES, make_backbone, tiny_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEMPLATE = ["a photo of a {}."]


def _counting(backbone):
    """Count images through the backbone's image encoder."""
    calls = {"images": 0}
    original = backbone.encode_image

    def encode_image(images, *a, **kw):
        calls["images"] += images.shape[0]
        return original(images, *a, **kw)

    backbone.encode_image = encode_image
    return calls


def _encode(bb, dm, tmp_path, items=None, transform=None, views=1, **kw):
    return encode_items(bb, items if items is not None else dm.train_items, dm.dataset.root,
                        transform or dm.train_transform(), views=views, dataset="colours", split="train",
                        cache_dir=tmp_path / "cache", batch_size=16, **kw)


# ------------------------------------------------------------------ same logits, same views -----
def test_cached_views_give_the_logits_and_gradients_of_the_same_images(tiny_datamodule, tmp_path):
    bb, dm = make_backbone(), tiny_datamodule
    torch.manual_seed(0)
    coop = build_method("coop", {"n_ctx": 4}, bb, dm.train_classnames, TEMPLATE).train()
    cached = _encode(bb, dm, tmp_path, views=3)
    assert cached.features.shape == (3, len(dm.train_items), bb.embed_dim) and not cached.hit
    assert not torch.allclose(cached.features[0], cached.features[1])  # views differ
    for view in (0, 2):
        ds = ViewDataset(dm.train_items, dm.dataset.root, dm.train_transform(), views=[view])
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        from_images = coop(images)
        from_cache = coop.forward_features(cached.features[view])
        assert (from_images - from_cache).abs().max() <= 1e-5
        g_img = torch.autograd.grad(F.cross_entropy(from_images, cached.labels), coop.prompts.ctx)[0]
        g_feat = torch.autograd.grad(F.cross_entropy(from_cache, cached.labels), coop.prompts.ctx)[0]
        assert torch.allclose(g_img, g_feat, atol=1e-6)


def test_fit_on_cached_features_equals_fit_on_the_same_images(image_folder, tmp_path):
    """The runner's cached path trains exactly as images would, view for view, epoch for epoch."""
    over = tiny_overrides(image_folder, tmp_path, **{
        "method.n_ctx": 2, "optim.lr": 0.05, "optim.warmup_epochs": 0, "trainer.max_epochs": 3,
        "data.cache_views": 2, "data.cache_dir": str(tmp_path / "cache"), "run_name": "cached"})
    recipe = load_recipe(RECIPES / "coop/fewshot.yaml", over)
    cached = Experiment(recipe)
    assert cached.inputs == "features"
    init = cached.method.prompts.ctx.detach().clone()
    cached.fit()

    plain = Experiment(load_recipe(RECIPES / "coop/fewshot.yaml", over + ["cache=false", "run_name=plain"]))
    assert plain.inputs == "images"
    with torch.no_grad():
        plain.method.prompts.ctx.copy_(init)
    dm = plain.data
    images = ViewDataset(dm.train_items, dm.dataset.root, dm.train_transform(), views=[0, 1])
    n = len(dm.train_items)

    class SameViews(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, key):
            i, v = key
            return images[v * n + i][:2]

    sampler = EpochViewSampler(n, 2, shuffle=True, seed=recipe.seed)
    loader = torch.utils.data.DataLoader(SameViews(), batch_size=dm.cfg.batch_size, sampler=sampler,
                                         drop_last=n > dm.cfg.batch_size)
    dm.train_dataloader = lambda world_size=1, rank=0: loader
    plain.fit()
    trained = cached.method.prompts.ctx.detach()
    assert not torch.allclose(trained, init, atol=1e-3)  # it trained
    assert (plain.method.prompts.ctx.detach() - trained).abs().max() <= 1e-5


def test_every_view_is_used_once_per_cycle_of_epochs():
    sampler = EpochViewSampler(n_items=7, n_views=3, shuffle=True, seed=1)
    seen = torch.stack([sampler.views_of(e) for e in range(3)], dim=1)  # [items, epochs]
    assert all(sorted(row.tolist()) == [0, 1, 2] for row in seen)
    sampler.set_epoch(4)
    pairs = list(sampler)
    assert sorted(i for i, _ in pairs) == list(range(7))
    assert [v for _, v in sorted(pairs)] == sampler.views_of(4).tolist()
    assert list(sampler) != pairs  # the next pass is the next epoch


def test_evaluation_on_cached_features_matches_images(image_folder, tmp_path):
    over = tiny_overrides(image_folder, tmp_path, **{
        "method.n_ctx": 4, "data.setting": "base2novel", "run_name": "b2n",
        "data.cache_dir": str(tmp_path / "cache")})
    results = run_fit(load_recipe(RECIPES / "coop/base2novel.yaml", over))
    assert results["inputs"] == "features"
    run = tmp_path / "b2n"
    plain = run_test(load_recipe(run / "recipe.yaml", ["cache=false"]), run)
    assert plain["inputs"] == "images"
    assert plain["metrics"] == results["metrics"]


# ------------------------------------------------------------------ reuse and invalidation ------
def test_cache_is_reused_and_invalidated_by_what_determines_the_features(tiny_datamodule, tmp_path):
    bb, dm = make_backbone(), tiny_datamodule
    calls = _counting(bb)
    n = len(dm.train_items)
    first = _encode(bb, dm, tmp_path, views=3)
    assert not first.hit and calls["images"] == 3 * n
    again = _encode(bb, dm, tmp_path, views=3)
    fewer = _encode(bb, dm, tmp_path, views=2)  # the first two views of the 3-view entry
    assert again.hit and fewer.hit and calls["images"] == 3 * n
    assert torch.equal(again.features, first.features) and torch.equal(fewer.features, first.features[:2])

    def misses(**kw):
        before = calls["images"]
        got = _encode(bb, dm, tmp_path, **kw)
        assert not got.hit and calls["images"] > before
        return got

    # another transform (crop scale), another split (item list), another backbone (same name,
    # other weights), a changed image file: each is a new entry
    misses(views=3, transform=train_transform(dm.image_size, dm.mean, dm.std, scale=(0.5, 1.0)))
    misses(views=3, items=dm.val_items)
    other = make_backbone(seed=1)
    _counting(other)
    assert not _encode(other, dm, tmp_path, views=3).hit
    item = dm.train_items[0]
    path = Path(dm.dataset.root) / item.path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a regenerated file
    try:
        misses(views=3)
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _encode(bb, dm, tmp_path, views=3).hit  # the original entry is still valid

    # the split's name, the view seed and the weights are all part of the key
    base = fingerprint(bb, dm.train_items, dm.dataset.root, dm.train_transform(), split="train")
    for changed in (fingerprint(bb, dm.train_items, dm.dataset.root, dm.train_transform(), split="val"),
                    fingerprint(bb, dm.train_items, dm.dataset.root, dm.train_transform(), split="train", seed=1),
                    fingerprint(other, dm.train_items, dm.dataset.root, dm.train_transform(), split="train")):
        assert key_of(changed) != key_of(base)


def test_cache_off_never_writes(tiny_datamodule, tmp_path):
    bb, dm = make_backbone(), tiny_datamodule
    got = _encode(bb, dm, tmp_path, cache=False)
    assert not got.hit and not (tmp_path / "cache").exists()


def test_incomplete_or_damaged_entries_are_recomputed_and_stale_ones_listed(tiny_datamodule, tmp_path):
    bb, dm = make_backbone(), tiny_datamodule
    test = test_transform(dm.image_size, dm.mean, dm.std)
    first = _encode(bb, dm, tmp_path, transform=test)
    store = FeatureCache(tmp_path / "cache")
    [entry] = store.entries()
    data = Path(entry["path"])
    data.write_bytes(data.read_bytes()[:-7])  # truncated file: size no longer matches the manifest
    assert store.stale_entries() and store.stale_entries()[0]["key"] == entry["key"]
    again = _encode(bb, dm, tmp_path, transform=test)
    assert not again.hit and torch.allclose(again.features, first.features)
    manifest = data.with_suffix(".json")
    meta = json.loads(manifest.read_text())
    meta["components"]["transform"] = "something else"  # a manifest that does not describe the entry
    manifest.write_text(json.dumps(meta))
    assert not _encode(bb, dm, tmp_path, transform=test).hit
    # the cache written for a changed item list supersedes the old one for the same slot
    _encode(bb, dm, tmp_path, transform=test, items=dm.train_items[:-1])
    assert len(store.stale_entries()) >= 1
    removed = store.prune()
    assert removed >= 1 and not store.stale_entries()
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary files left behind


# ------------------------------------------------------------------ memory plan ----------------
def test_memory_plan_checkpoints_and_chunks_many_classes_only():
    cfg = BackboneConfig()  # automatic, 2 GiB
    # ViT-B/16's text tower: 100 CoOp prompts of 26 positions fit; 1000 of 30 do not
    assert text_memory_plan(cfg, 100, 26, 512, 12, grad=True) == (0, False)
    chunk, ckpt = text_memory_plan(cfg, 1000, 30, 512, 12, grad=True)
    assert ckpt and 0 < chunk < 1000
    assert text_memory_plan(cfg, 1000, 30, 512, 12, grad=False)[1] is False  # no grads, nothing kept
    explicit = BackboneConfig(text_chunk_size=0, grad_checkpointing=False)
    assert text_memory_plan(explicit, 1000, 30, 512, 12, grad=True) == (0, False)
    assert text_memory_plan(BackboneConfig(text_chunk_size=7, grad_checkpointing=True), 10, 5, 8, 2, True) == (7, True)


@pytest.mark.parametrize("position", ["end", "middle"])  # the shared-prefix path and the full sequences
def test_automatic_chunking_and_checkpointing_keep_the_gradients(monkeypatch, position):
    plain = make_backbone(text_chunk_size=0, grad_checkpointing=False)
    # a tiny budget: the plan must engage (the shared prefix keeps fewer activations, so tinier)
    auto = make_backbone(text_memory_mb=1.0 if position == "middle" else 0.1)
    cfg = {"n_ctx": 4, "class_token_position": position}
    coop_plain = build_method("coop", cfg, plain, CLASSES * 3, TEMPLATE).train()
    coop_auto = build_method("coop", cfg, auto, CLASSES * 3, TEMPLATE).train()
    assert coop_auto.prompts.shares_prefix is (position == "end")
    coop_auto.load_trainable_state(coop_plain.trainable_state())
    n = len(CLASSES) * 3
    length = int(auto.eot_positions(coop_auto.prompts.tokens).max()) + 1
    chunk, ckpt = text_memory_plan(auto.config, n, length, auto.text_width, auto.text_depth, True)
    assert ckpt and 0 < chunk < n
    used = []
    real = fused_blocks.checkpoint
    monkeypatch.setattr(fused_blocks, "checkpoint", lambda *a, **k: used.append(1) or real(*a, **k))
    feats = F.normalize(torch.randn(5, plain.embed_dim), dim=-1)
    labels = torch.arange(5)
    grads = []
    for method in (coop_plain, coop_auto):
        logits = method.forward_features(feats)
        grads.append(torch.autograd.grad(F.cross_entropy(logits, labels), method.prompts.ctx)[0])
    chunks, rest = divmod(len(used), auto.text_depth)
    assert rest == 0 and chunks > 1  # every block of every chunk checkpointed, and more than one chunk
    if position == "middle":  # full sequences: the plan above, exactly
        assert chunks == -(-n // chunk)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5  # fp32 round-off of another summation order


def test_weights_digest_follows_changes_to_the_weights(tiny_backbone):
    """The cache key's weight digest sees an in-place update and an injected module, so no entry
    made with other weights is ever read."""
    from adapt.data.feature_cache import weights_digest
    from adapt.split_attention import split_attention

    bb = tiny_backbone.clone()
    first = weights_digest(bb)
    assert weights_digest(bb) == first == weights_digest(tiny_backbone)
    with torch.no_grad():
        bb.model.visual.proj.mul_(1.5)
    moved = weights_digest(bb)
    assert moved != first
    split_attention(b for _, b in bb.blocks("image"))  # same numbers, other tensors and names
    assert weights_digest(bb) not in (first, moved)
    assert weights_digest(tiny_backbone) == first


# ------------------------------------------------------------------ dense features -------------
def test_dense_entries_hold_the_dense_outputs_of_the_same_images(tiny_datamodule, tmp_path):
    from adapt.dense import unpack_dense

    bb, dm = make_backbone(), tiny_datamodule
    items = dm.train_items[:10]
    dense = ("pooled", "tokens", "value")
    cached = _encode(bb, dm, tmp_path, items=items, transform=dm.test_transform(), dense=dense, normalize=False)
    ds = ViewDataset(items, dm.dataset.root, dm.test_transform(), views=[0])
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = bb.encode_image_dense(images, outputs=dense, normalize=False)
    got = unpack_dense(cached.features[0], dense)
    side = ref.grid[0]
    assert cached.features.shape == (1, 10, 1 + 2 * side * side, bb.embed_dim) and got.grid == ref.grid
    for name in dense:
        assert (getattr(got, name) - getattr(ref, name)).abs().max() <= 1e-5, name
    # read back from disk; float16 storage is its own entry, within half precision of float32
    again = _encode(bb, dm, tmp_path, items=items, transform=dm.test_transform(), dense=dense, normalize=False)
    half = _encode(bb, dm, tmp_path, items=items, transform=dm.test_transform(), dense=dense, normalize=False,
                   dtype=torch.float16)
    assert again.hit and torch.equal(again.features, cached.features)
    assert not half.hit and half.features.dtype == torch.float16 and half.key != cached.key
    assert ((half.features.float() - cached.features).abs() / cached.features.abs().clamp_min(1)).max() <= 1e-3
    pooled = _encode(bb, dm, tmp_path, items=items, transform=dm.test_transform(), normalize=False)
    assert pooled.key not in (cached.key, half.key) and pooled.features.shape == (1, 10, bb.embed_dim)
    # pooled entries keep the keys they had before dense entries existed
    plain = fingerprint(bb, items, dm.dataset.root, dm.test_transform())
    assert "dense" not in plain and "storage" not in plain


# ------------------------------------------------------------------ concurrent processes --------
def _hold_lock(cache_dir, components, entered, release):
    with FeatureCache(cache_dir).lock(components):
        entered.set()
        release.wait(120)


def _take_lock(cache_dir, components, trying, acquired):
    trying.set()
    with FeatureCache(cache_dir).lock(components):
        acquired.set()


def _encode_in_process(items, root, cache_dir, start, results):
    from adapt.data.transforms import test_transform

    bb = make_backbone()  # the same seed: the same weights, the same key in every process
    start.wait(120)
    got = encode_items(bb, items, root, test_transform(bb.image_size, bb.image_mean, bb.image_std),
                       dataset="colours", split="train", cache_dir=cache_dir, batch_size=16)
    results.put((got.hit, got.features.sum().item()))


def test_the_per_key_lock_holds_across_processes(tmp_path):
    """Runs of a comparison in other processes (Ray workers, array tasks) share the cache: a
    process waits while another holds an entry's lock."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children only take a file lock: no torch work after fork
    components = {"entry": "one"}
    entered, release, trying, acquired = (ctx.Event() for _ in range(4))
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, components, entered, release))
    holder.start()
    assert entered.wait(120)
    waiter = ctx.Process(target=_take_lock, args=(tmp_path, components, trying, acquired))
    waiter.start()
    assert trying.wait(120)
    assert not acquired.wait(1.0)  # blocked while the other process holds the lock
    release.set()
    assert acquired.wait(120)
    for p in (holder, waiter):
        p.join(60)
        assert p.exitcode == 0


def test_concurrent_processes_encode_an_entry_once(tiny_datamodule, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_encode_in_process, args=(tiny_datamodule.train_items, tiny_datamodule.dataset.root,
                                                            tmp_path / "cache", start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(hit for hit, _ in got) == [False, True]  # one computed it, the other read it
    assert got[0][1] == got[1][1]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
