"""Nothing of the user's is lost: run directories, resume, divergence, interruption, atomic files.

The interruption tests run ``adapt fit`` in a subprocess and kill it (SIGKILL, SIGINT, SIGTERM)
once its first checkpoint exists, then resume and compare the adapter bytes with those of an
uninterrupted run of the same recipe and seed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapt.cli import main
from adapt.config import RecipeError, load_recipe
from adapt.run import run_fit
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ADAPTER = Path("adapter") / "adapter.safetensors"


def _fit(image_folder, tmp_path, run_name="run", **extra):
    over = tiny_overrides(image_folder, tmp_path, **{"run_name": run_name, **extra})
    return load_recipe(RECIPES / "coop/fewshot.yaml", over)


# ------------------------------------------------------------------ run directories (items 2, 3, 5)
def test_a_finished_run_is_never_overwritten(image_folder, tmp_path, capsys):
    run_fit(_fit(image_folder, tmp_path))
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="already holds a finished run.*resume=true.*overwrite=true"):
        run_fit(_fit(image_folder, tmp_path, **{"optim.lr": 0.01}))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # overwrite=true moves the old run aside, byte for byte, and trains a new one
    run_fit(_fit(image_folder, tmp_path, overwrite="true"))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1
    assert {aside[0] / p.relative_to(run): b for p, b in before.items()} == {
        p: p.read_bytes() for p in aside[0].rglob("*") if p.is_file()}
    assert (run / "results.json").is_file()


def test_resume_refuses_a_changed_recipe_and_a_shorter_run(image_folder, tmp_path):
    run_fit(_fit(image_folder, tmp_path))
    with pytest.raises(RecipeError, match=r"differs .*optim\.lr: 0\.002 -> 0\.5"):
        run_fit(_fit(image_folder, tmp_path, resume="true", **{"optim.lr": 0.5}))
    with pytest.raises(RecipeError, match="trainer.max_epochs=1 is lower than the 2 epochs"):
        run_fit(_fit(image_folder, tmp_path, resume="true", **{"trainer.max_epochs": 1}))
    # only the reporting keys may change, and max_epochs may grow
    results = run_fit(_fit(image_folder, tmp_path, resume="true", **{"trainer.max_epochs": 3,
                                                                      "logger.csv": "true"}))
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 3
    assert results["metrics"]["test_acc"] >= 0


def test_resume_without_a_checkpoint_starts_fresh_only_when_nothing_can_be_lost(
        image_folder, tmp_path, capsys):
    """Cluster scripts pass resume=true on every start: a new folder, or the same recipe stopped
    before its first checkpoint, starts from scratch; a finished run, another recipe or foreign
    files are refused, untouched."""
    first = run_fit(_fit(image_folder, tmp_path, resume="true"))
    assert "holds no run yet; starting it from scratch" in capsys.readouterr().out
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints")  # a finished run without its checkpoint: nothing to continue
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="holds a finished run and no checkpoint.*overwrite=true"):
        run_fit(_fit(image_folder, tmp_path, resume="true"))
    # the same recipe, stopped before its first checkpoint (no results): trained again, same numbers
    (run / "results.json").unlink()
    del before[run / "results.json"]
    with pytest.raises(RecipeError, match=r"differs from the one saved in .*recipe.yaml: optim\.lr"):
        run_fit(_fit(image_folder, tmp_path, resume="true", **{"optim.lr": 0.5}))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    again = run_fit(_fit(image_folder, tmp_path, resume="true"))
    assert "stopped before its first checkpoint; starting it again from scratch" in capsys.readouterr().out
    assert again["metrics"] == first["metrics"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not an adapt run's"):
        run_fit(_fit(image_folder, tmp_path, run_name="other", resume="true"))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_evaluating_a_run_on_other_data_leaves_its_files_alone(image_folder, tmp_path):
    from tests.conftest import write_image_folder

    run_fit(_fit(image_folder, tmp_path))
    run = tmp_path / "run"
    kept = {n: (run / n).read_bytes() for n in ("manifest.json", "results.json", "recipe.yaml")}
    other = write_image_folder(tmp_path / "other", per_split={"train": 4, "test": 3}, seed=7)
    assert main(["test", str(run), f"data.root={other}"]) == 0
    assert {n: (run / n).read_bytes() for n in kept} == kept
    assert json.loads((run / "test_results.json").read_text())["metrics"]["test_acc"] >= 0


# ------------------------------------------------------------------ divergence (item 4)
def test_a_divergent_run_stops_and_writes_no_adapter(image_folder, tmp_path, capsys):
    over = tiny_overrides(image_folder, tmp_path, **{"run_name": "nan", "optim.lr": 1e8,
                                                     "optim.warmup_epochs": 0, "trainer.max_epochs": 6})
    assert main(["fit", str(RECIPES / "coop/fewshot.yaml"), *over]) == 2
    err = capsys.readouterr().err
    assert "training diverged: the loss is nan at step" in err and "No adapter was written" in err
    run = tmp_path / "nan"
    assert not (run / ADAPTER).exists() and not (run / "results.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "diverged"
    if (run / "checkpoints/last.ckpt").exists():  # any checkpoint written holds finite values
        state = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "resume=true" not in err


def test_no_adapter_with_nan_is_saved_or_loaded(tiny_backbone, tmp_path):
    from adapt.engine import TrainingDiverged
    from adapt.export import AdapterError, load_adapter, save_adapter
    from adapt.methods import build_method

    coop = build_method("coop", {"n_ctx": 2}, tiny_backbone, ["a", "b"], ["a photo of a {}."])
    save_adapter(coop, tmp_path / "good")
    with torch.no_grad():
        coop.prompts.ctx[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        save_adapter(coop, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # a file whose tensors were made non-finite by hand (checksum re-recorded) is refused on load
    from safetensors.torch import save_file

    from adapt.export import sha256_of
    save_file({"prompts.ctx": coop.prompts.ctx.detach().clone()}, str(tmp_path / "good/adapter.safetensors"))
    meta = json.loads((tmp_path / "good/adapter.json").read_text())
    meta["weights_sha256"] = sha256_of(tmp_path / "good/adapter.safetensors")
    (tmp_path / "good/adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="nan / inf"):
        load_adapter(tmp_path / "good", backbone=tiny_backbone)


# ------------------------------------------------------------------ interruption (items 6-8)
def _default_sigint() -> None:
    # a shell starts a background job (`pytest ... &`) with SIGINT ignored, its children inherit
    # that, and Python then never raises KeyboardInterrupt: the CLI starts as a terminal would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, tmp_path, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "adapt.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **popen)


def _run(args, tmp_path) -> subprocess.CompletedProcess:
    proc = _cli(args, tmp_path)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _interrupt_after_first_checkpoint(args, tmp_path, run: Path, sig) -> subprocess.CompletedProcess:
    proc = _cli(args, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _training_args(image_folder, tmp_path, run_name):
    # images in the loop (no feature cache): every epoch draws new augmentations, so a resume that
    # did not restore the generators would train on other pixels and end with other bytes
    return ["fit", str(RECIPES / "coop/fewshot.yaml"), *tiny_overrides(image_folder, tmp_path, **{
        "run_name": run_name, "cache": "false", "trainer.max_epochs": 40,
        "trainer.checkpoint_every_n_epochs": 4, "method.n_ctx": 2, "optim.lr": 0.05})]


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_training_args(image_folder, tmp, "ref"), tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "ref"


def test_same_recipe_and_seed_give_identical_adapter_bytes(image_folder, tmp_path, uninterrupted):
    again = _run(_training_args(image_folder, tmp_path, "again"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / ADAPTER).read_bytes() == (uninterrupted / ADAPTER).read_bytes()


def _resume_matches(image_folder, tmp_path, run, uninterrupted):
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    done = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    assert 0 < done < 40  # stopped midway
    resumed = _run(_training_args(image_folder, tmp_path, run.name) + ["resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / ADAPTER).read_bytes() == (uninterrupted / ADAPTER).read_bytes()
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert metrics == json.loads((uninterrupted / "results.json").read_text())["metrics"]


def test_sigkill_then_resume_gives_the_uninterrupted_bytes(image_folder, tmp_path, uninterrupted):
    run = tmp_path / "killed"
    killed = _interrupt_after_first_checkpoint(_training_args(image_folder, tmp_path, "killed"),
                                               tmp_path, run, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    _resume_matches(image_folder, tmp_path, run, uninterrupted)


def test_killed_before_its_first_checkpoint_then_resume_gives_the_uninterrupted_bytes(
        image_folder, tmp_path, uninterrupted):
    run = tmp_path / "early"
    args = _training_args(image_folder, tmp_path, "early")
    proc = _cli(args, tmp_path)
    deadline = time.monotonic() + 240
    while not (run / "status.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "recipe.yaml").is_file() and not (run / "checkpoints/last.ckpt").exists()
    resumed = _run(args + ["resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stopped before its first checkpoint; starting it again from scratch" in resumed.stdout
    assert (run / ADAPTER).read_bytes() == (uninterrupted / ADAPTER).read_bytes()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_print_the_resume_command_and_exit_nonzero(
        image_folder, tmp_path, uninterrupted, sig, code):
    run = tmp_path / "stopped"
    args = _training_args(image_folder, tmp_path, "stopped")
    stopped = _interrupt_after_first_checkpoint(args, tmp_path, run, sig)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "training stopped (checkpoint after epoch" in stopped.stderr
    assert "resume with: adapt fit " in stopped.stderr and stopped.stderr.rstrip().endswith("resume=true")
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    _resume_matches(image_folder, tmp_path, run, uninterrupted)


def test_checkpoints_are_written_during_training(image_folder, tmp_path):
    from adapt.checkpointing import RunCheckpoints, auto_every_n_epochs

    assert auto_every_n_epochs(200, None) == 50 and auto_every_n_epochs(3, None) == 1
    assert auto_every_n_epochs(200, 7) == 7
    saved = []
    orig = RunCheckpoints.on_train_epoch_end

    def spy(self, trainer, pl_module):
        orig(self, trainer, pl_module)
        saved.append(self.saved_epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunCheckpoints, "on_train_epoch_end", spy)
        run_fit(_fit(image_folder, tmp_path, **{"trainer.max_epochs": 8}))
    assert saved == [None, 2, 2, 4, 4, 6, 6, 8]  # four times per run, the last epoch included


# ------------------------------------------------------------------ atomic files (item 9)
def test_a_writer_killed_midway_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": true}')
    code = (
        "import os, signal, sys\n"
        "from adapt.io import atomic_save\n"
        "def half(tmp):\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'{\"new\": tr'); f.flush(); os.fsync(f.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_save({str(target)!r}, half)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == '{"old": true}'


def test_files_honour_the_umask(tiny_backbone, tmp_path):
    from adapt.export import save_adapter
    from adapt.io import atomic_write_json
    from adapt.methods import build_method

    old = os.umask(0o022)
    try:
        save_adapter(build_method("coop", {"n_ctx": 2}, tiny_backbone, ["a", "b"], ["{}"]), tmp_path / "a")
        atomic_write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    for p in (tmp_path / "a/adapter.safetensors", tmp_path / "a/adapter.json", tmp_path / "r.json"):
        assert p.stat().st_mode & 0o777 == 0o644, p


# ------------------------------------------------------------------ adapters (item 17)
@pytest.fixture()
def adapter_dir(tiny_backbone, tmp_path):
    from adapt.export import save_adapter
    from adapt.methods import build_method

    return save_adapter(build_method("coop", {"n_ctx": 2}, tiny_backbone, ["a", "b"], ["{}"]), tmp_path / "ad")


def test_adapter_metadata_records_and_verifies_the_checksum(adapter_dir, tiny_backbone):
    from adapt.export import FORMAT_VERSION, AdapterError, load_adapter, sha256_of

    meta = json.loads((adapter_dir / "adapter.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["weights_sha256"] == sha256_of(adapter_dir / "adapter.safetensors")
    assert load_adapter(adapter_dir, backbone=tiny_backbone).prompts.n_ctx == 2
    weights = adapter_dir / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a truncated copy
    with pytest.raises(AdapterError, match="does not match the sha256"):
        load_adapter(adapter_dir, backbone=tiny_backbone)
    meta.pop("weights_sha256")  # without a checksum the truncated tensor file itself is named
    (adapter_dir / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="adapter.safetensors is not a readable safetensors file"):
        load_adapter(adapter_dir, backbone=tiny_backbone)


def test_adapter_metadata_errors_name_the_file(adapter_dir, tiny_backbone):
    from adapt.export import AdapterError, load_adapter

    meta_path = adapter_dir / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(AdapterError, match="adapter.json is not valid JSON"):
        load_adapter(adapter_dir, backbone=tiny_backbone)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "classnames"}))
    with pytest.raises(AdapterError, match="adapter.json lacks the field.*classnames"):
        load_adapter(adapter_dir, backbone=tiny_backbone)


def test_adapter_of_another_architecture_says_so(adapter_dir):
    from adapt.export import AdapterError, load_adapter
    from tests.conftest import make_backbone

    # same names in the metadata, other widths: blame the shapes, not the backbone's name
    wide = make_backbone("test-vit-wide")
    meta = json.loads((adapter_dir / "adapter.json").read_text())
    meta["backbone"].update(name="test-vit-wide", embed_dim=wide.embed_dim)
    (adapter_dir / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="tensors do not fit a coop built on it .*prompts.ctx has shape"):
        load_adapter(adapter_dir, backbone=wide)


def test_export_refuses_to_overwrite_itself_or_a_file(image_folder, tmp_path, capsys):
    run_fit(_fit(image_folder, tmp_path))
    run = tmp_path / "run"
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    first = (out / "adapter.safetensors").read_bytes()
    assert main(["export", str(run), str(out)]) == 2
    assert "already holds an adapter; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert (out / "adapter.safetensors").read_bytes() == first
    assert main(["export", str(run), str(run / "adapter")]) == 2
    assert "the run's own adapter folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), str(tmp_path / "afile")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ the backbone (item 18)
def test_the_backbone_can_be_deep_copied(tiny_backbone):
    import copy

    twin = copy.deepcopy(tiny_backbone)
    tokens = tiny_backbone.tokenize(["a photo of a cat."])
    with torch.no_grad():
        assert torch.equal(twin.encode_text(tokens), tiny_backbone.encode_text(tokens))
    assert twin.model is not tiny_backbone.model
