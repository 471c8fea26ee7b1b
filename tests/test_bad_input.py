"""Bad input gets one message that names the problem and the fix, before training time is spent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.backbone import BackboneConfig, build_backbone
from adapt.cli import main
from adapt.config import RecipeError, load_recipe
from adapt.data import DataConfig
from adapt.datamodule import AdaptDataModule
from adapt.data.registry import build_dataset
from adapt.run import run_fit
from tests.conftest import make_backbone, tiny_overrides, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _dm(root: Path, **kw) -> AdaptDataModule:
    cfg = DataConfig(root=str(root), num_workers=0, **{"shots": 2, **kw})
    return AdaptDataModule(cfg, 32, (0.5,) * 3, (0.5,) * 3, seed=1)


# ------------------------------------------------------------------ world vs a user's folder (1)
def test_quickstart_pointed_at_my_photos_refuses_and_keeps_them(tmp_path, capsys):
    photos = write_image_folder(tmp_path / "photos", per_split={"train": 2, "test": 1})
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    assert main(["fit", str(RECIPES / "quickstart.yaml"), f"data.root={photos}",
                 f"output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "is not a generated build of the world task 'world_colour'" in err
    assert "data.dataset=imagefolder" in err
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before


# ------------------------------------------------------------------ images (11)
def test_a_truncated_image_is_named_before_training(tmp_path):
    root = write_image_folder(tmp_path / "d", per_split={"train": 3, "test": 2})
    victim = root / "test" / "red" / "1.png"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"1 image file\(s\) cannot be read: test: test/red/1.png"):
        _dm(root).setup()
    dm = _dm(root, bad_images="skip")
    dm.setup()
    assert dm.skipped_images == {"test": 1}
    assert all(it.path != "test/red/1.png" for _, items in dm.eval_sets.values() for it in items)


def test_a_truncated_jpeg_is_caught_by_the_cheap_check(tmp_path):
    from PIL import Image

    from adapt.data.checks import image_problem

    path = tmp_path / "x.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, quality=90)
    assert image_problem(path, decode=False) is None and image_problem(path, decode=True) is None
    path.write_bytes(path.read_bytes()[:-200])
    assert image_problem(path, decode=False) is not None  # PIL's verify or the end-of-image check
    assert image_problem(path, decode=True) is not None


def test_skipped_images_and_per_class_counts_reach_results(image_folder, tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", per_split={"train": 4, "test": 2})
    (root / "train/red/0.png").write_bytes(b"garbage")
    for p in sorted((root / "train/blue").glob("*.png"))[1:]:
        p.unlink()  # blue keeps a single training image
    over = tiny_overrides(root, tmp_path, **{"data.shots": 3, "data.allow_fewer_shots": "true",
                                             "data.bad_images": "skip", "trainer.max_epochs": 1})
    with caplog.at_level("WARNING"):
        results = run_fit(load_recipe(RECIPES / "coop/fewshot.yaml", over))
    assert "fewer than 3 training images: blue (1)" in caplog.text
    assert results["skipped_images"] == {"train": 1}
    counts = results["train_counts"]
    assert counts["blue"] == 1 and counts["red"] == 2 and counts["green"] == 3
    saved = json.loads(Path(results["run_dir"], "results.json").read_text())
    assert saved["train_counts"] == counts and saved["shots"] == 3


# ------------------------------------------------------------------ csv (12)
def _csv(tmp_path, rows, classes_file=None):
    root = write_image_folder(tmp_path / "img", per_split={"train": 2, "test": 1})
    lines = ["path,label,split"] + [",".join(r) for r in rows]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(classes_file) + "\n")
    return root


def test_csv_garbage_label_is_an_error_naming_class_and_lines(tmp_path):
    rows = [("train/red/0.png", "red", "train"), ("train/green/0.png", "green", "train"),
            ("test/red/0.png", "red", "test"), ("test/green/0.png", "gren", "test"),
            ("test/green/0.png", "green", "test")]
    root = _csv(tmp_path, rows)
    with pytest.raises(ValueError, match=r"class 'gren' has no train rows but appears in test on line\(s\) 5"):
        build_dataset(DataConfig(dataset="csv", root=str(root)))
    # a class-list file fixes the set: the typo is named with its line
    root = _csv(tmp_path, rows, classes_file=["red", "green"])
    with pytest.raises(ValueError, match=r"label 'gren' is not in .*classes.txt \(test on line\(s\) 5\)"):
        build_dataset(DataConfig(dataset="csv", root=str(root), classnames_file="classes.txt"))
    ok = _csv(tmp_path, [r for r in rows if r[1] != "gren"], classes_file=["green", "red"])
    ds = build_dataset(DataConfig(dataset="csv", root=str(ok), classnames_file="classes.txt"))
    assert ds.classnames == ["green", "red"] and ds.train[0].label == 1  # the file's order


def test_csv_missing_paths_are_counted_up_front(tmp_path):
    rows = [("train/red/0.png", "red", "train"), ("train/green/0.png", "green", "train"),
            ("train/red/9.png", "red", "train"), ("test/red/0.png", "red", "test"),
            ("test/green/7.png", "green", "test")]
    root = _csv(tmp_path, rows)
    dm = _dm(root, dataset="csv", shots=0)
    with pytest.raises(FileNotFoundError, match=r"2 image file\(s\) .* do not exist .*train: train/red/9.png; test: test/green/7.png"):
        dm.setup()


# ------------------------------------------------------------------ offline weights (14)
def test_unreachable_hub_fails_fast_with_the_offline_message(monkeypatch):
    import huggingface_hub.constants as hub
    import open_clip

    import adapt.backbone_loading as bl

    seen, before = {}, hub.HF_HUB_OFFLINE

    def fake_create(*args, **kwargs):
        seen["offline"] = hub.HF_HUB_OFFLINE
        raise RuntimeError("not in cache")

    monkeypatch.setattr(bl, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model", fake_create)
    with pytest.raises(RuntimeError, match="(?s)hub is not reachable .* backbone.pretrained=/path/to/checkpoint"):
        bl._from_tag(BackboneConfig(name="ViT-B-16", pretrained="openai"))
    assert seen["offline"] is True  # no request, so none of huggingface_hub's retries
    assert hub.HF_HUB_OFFLINE == before  # restored afterwards


def test_data_is_checked_before_the_weights(tmp_path, monkeypatch, capsys):
    import adapt.run as run

    monkeypatch.setattr(run, "build_backbone", lambda cfg: pytest.fail("backbone loaded before the data"))
    assert main(["fit", str(RECIPES / "coop/fewshot.yaml"), f"data.root={tmp_path / 'nope'}",
                 f"output_dir={tmp_path}"]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ checkpoint files (15)
def test_checkpoint_file_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x69" * 105)
    with pytest.raises(ValueError, match="cannot read checkpoint .*garbage.pt: it is not a torch"):
        build_backbone(BackboneConfig(name="adapt-tiny-vit", pretrained=str(garbage)))
    wide = tmp_path / "wide.pt"
    torch.save(make_backbone("test-vit-wide").model.state_dict(), wide)
    with pytest.raises(ValueError, match="another architecture than 'adapt-tiny-vit'. Its shapes fit test-vit-wide"):
        build_backbone(BackboneConfig(name="adapt-tiny-vit", pretrained=str(wide)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_openai_layout_state_dicts_load_whatever_their_dtype(tmp_path, dtype):
    import open_clip

    # named as its architecture: loaded into it (the config's QuickGELU), fp32 as well as fp16
    src = make_backbone("test-vit-openai", seed=5)
    path = tmp_path / "ViT-x.pt"
    torch.save({k: v.to(dtype) for k, v in src.model.state_dict().items()}, path)
    loaded = build_backbone(BackboneConfig(name="test-vit-openai", pretrained=str(path)))
    # a size no model config has: the architecture is read off the weights, with QuickGELU
    # (OpenAI's builder infers one head per 64 channels)
    odd = open_clip.model.CLIP(embed_dim=40, quick_gelu=True,
                               vision_cfg=dict(image_size=32, layers=3, width=64, head_width=64, patch_size=8),
                               text_cfg=dict(context_length=20, vocab_size=49408, width=64, heads=1, layers=1))
    torch.save({k: v.to(dtype) for k, v in odd.state_dict().items()}, tmp_path / "odd.pt")
    rebuilt = build_backbone(BackboneConfig(name="adapt-tiny-vit", pretrained=str(tmp_path / "odd.pt")))
    odd = odd.to(dtype).float().eval()
    tokens = src.tokenize(["a photo of a cat."])
    images = torch.randn(2, 3, 32, 32)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        assert (loaded.encode_text(tokens) - src.encode_text(tokens)).abs().max() <= tol
        assert (loaded.encode_image(images) - src.encode_image(images)).abs().max() <= tol
        want = F.normalize(odd.encode_image(images), dim=-1)
        # OpenAI's builder differs from the direct build in its kernels' summation order (~1e-4);
        # the wrong activation or a lost tensor moves features by ~1e-2
        assert (rebuilt.encode_image(images) - want).abs().max() <= 1e-3


# ------------------------------------------------------------------ recipes (16)
def test_recipe_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("_base_: missing.yaml\nseed: 2\n")
    with pytest.raises(RecipeError, match=r"includes _base_: 'missing.yaml', which was not found \(looked for"):
        load_recipe(child)
    listy = tmp_path / "list.yaml"
    listy.write_text("- method: coop\n- seed: 2\n")
    with pytest.raises(RecipeError, match="is a YAML list, but a recipe is a mapping of sections"):
        load_recipe(listy)
    with pytest.raises(RecipeError, match="override 'data.shots' has no '=': overrides are key=value"):
        load_recipe(RECIPES / "coop/fewshot.yaml", ["data.shots"])
    with pytest.raises(RecipeError, match=r"optim.groups.norms must map lr_scale / weight_decay_scale / "
                                          r"warmup_epochs to numbers >= 0 \(e.g. optim.groups.norms.lr_scale=0.1\)"):
        load_recipe(RECIPES / "lasp/fewshot.yaml", ["optim.groups.norms.lr=0.1"])
    with pytest.raises(RecipeError, match="optim.groups.norms must map"):
        load_recipe(RECIPES / "lasp/fewshot.yaml", ["optim.groups.norms.lr_scale=-1"])


def test_n_ctx_that_disagrees_with_ctx_init_is_an_error(tiny_backbone):
    from adapt.methods import build_method

    with pytest.raises(ValueError, match=r"method.n_ctx=8 but method.ctx_init='a photo of a' has 4 tokens"):
        build_method("coop", {"n_ctx": 8, "ctx_init": "a photo of a"}, tiny_backbone, ["a", "b"], ["{}"])
    assert build_method("coop", {"ctx_init": "a photo of a"}, tiny_backbone, ["a"], ["{}"]).prompts.n_ctx == 4
    assert build_method("coop", {}, tiny_backbone, ["a"], ["{}"]).prompts.n_ctx == 16  # the paper's M
    assert build_method("cocoop", {"ctx_init": ""}, tiny_backbone, ["a"], ["{}"]).prompts.n_ctx == 4


def test_global_batch_must_divide_over_processes():
    from torch.utils.data import SequentialSampler

    from adapt.data.sharding import GlobalBatchShard

    with pytest.raises(ValueError, match="data.batch_size=30 is the global batch, .* multiple of 4"):
        GlobalBatchShard(SequentialSampler(range(10)), 30, 0, 4)
    # every process reads its slice of every global batch; together: each batch exactly once
    base = list(range(23))
    shards = [list(GlobalBatchShard(base, 8, r, 2, drop_ragged=True)) for r in range(2)]
    assert shards == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]  # ragged 16..22 dropped
    kept = [list(GlobalBatchShard(list(range(5)), 8, r, 2, drop_ragged=False)) for r in range(2)]
    assert kept == [[0, 1], [2, 3, 4]]
