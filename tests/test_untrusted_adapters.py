"""An adapter folder comes from someone else: the file names its adapter.json lists are read,
copied and written only inside the adapter folder (and the export's destination), whatever they
say, and a bad name is refused before anything is opened, so no answer tells what exists outside."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapt.cli import main
from adapt.export import AdapterError, export_run, load_adapter, save_adapter
from adapt.methods import build_method

MALFORMED = "not a plain relative name inside the adapter folder"


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture()
def home(tmp_path):
    """tmp/home holds a secret beside a run; run/adapter/../../.bashrc is that secret."""
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _coop_run(home: Path, backbone) -> Path:
    save_adapter(build_method("coop", {"n_ctx": 2}, backbone, ["a", "b"], ["{}"]), home / "run/adapter")
    return home / "run"


def _name_files(run: Path, files: list) -> None:
    meta_path = run / "adapter/adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = files
    meta_path.write_text(json.dumps(meta))


def _bad_name(form: str, run: Path, home: Path) -> str:
    adapter = run / "adapter"
    if form == "dotdot":
        return "../../.bashrc"
    if form == "nested-dotdot":
        return "peft/../../../.bashrc"
    if form == "absolute":
        return str(home / ".bashrc")
    if form == "file-link":  # a link inside the folder whose target is outside it
        (adapter / "config.json").symlink_to(home / ".bashrc")
        return "config.json"
    if form == "folder-link":
        (adapter / "peft").symlink_to(home, target_is_directory=True)
        return "peft/.bashrc"
    raise AssertionError(form)


FORMS = ["dotdot", "nested-dotdot", "absolute", "file-link", "folder-link"]


def _readers(tiny_backbone, out: Path):
    from adapt.inference import load_adapter as predict_loader

    return {
        "export": lambda run: export_run(run, out),
        "load": lambda run: load_adapter(run / "adapter", backbone=tiny_backbone),
        "predict": lambda run: predict_loader(run, backbone=tiny_backbone, device="cpu"),
    }


@pytest.mark.parametrize("form", FORMS)
def test_adapter_file_names_leaving_the_folder_are_refused_by_every_reader(form, home, tiny_backbone):
    run = _coop_run(home, tiny_backbone)
    secret = home / ".bashrc"
    secret.write_text("export SECRET=1\n")
    rel = _bad_name(form, run, home)
    _name_files(run, [rel])
    out = home / "a" / "out"  # out/../../.bashrc is the secret too
    before = _files(home)
    messages = {}
    for what, read in _readers(tiny_backbone, out).items():
        with pytest.raises(AdapterError) as err:
            read(run)
        messages[what] = str(err.value)
        assert str(run / "adapter/adapter.json") in messages[what] and repr(rel) in messages[what]
        assert MALFORMED in messages[what] and "malformed or untrusted" in messages[what]
        assert "export it again" in messages[what]
    assert not out.exists() and _files(home) == before  # nothing written, the secret untouched
    # the same answer whether the outside file exists: no oracle
    secret.unlink()
    for what, read in _readers(tiny_backbone, out).items():
        with pytest.raises(AdapterError) as err:
            read(run)
        assert str(err.value) == messages[what]


def test_the_cli_gives_one_message_for_a_traversing_adapter(home, tiny_backbone, capsys):
    run = _coop_run(home, tiny_backbone)
    _name_files(run, ["../../.bashrc"])
    assert main(["export", str(run), str(home / "a/out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapt export: error: ") and MALFORMED in err
    assert "Traceback" not in err and not (home / ".bashrc").exists()


@pytest.mark.parametrize("files", ["peft/x", {"a": 1}, [3], [""], ["peft/./x"], ["C:\\x"]])
def test_a_files_entry_that_is_no_plain_name_is_malformed(files, home, tiny_backbone):
    run = _coop_run(home, tiny_backbone)
    _name_files(run, files)
    with pytest.raises(AdapterError, match="malformed or untrusted"):
        load_adapter(run / "adapter", backbone=tiny_backbone)


def test_a_lora_adapter_exports_its_nested_peft_files(home, tiny_backbone):
    lora = build_method("lora", None, tiny_backbone, ["a", "b"], ["{}"])
    save_adapter(lora, home / "run/adapter")
    src = home / "run/adapter"
    names = json.loads((src / "adapter.json").read_text())["files"]
    assert names == ["peft/adapter_config.json", "peft/adapter_model.safetensors"]
    out = export_run(home / "run", home / "out")
    for rel in names + ["adapter.safetensors", "adapter.json"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert load_adapter(out, backbone=tiny_backbone).name == "lora"


def test_export_never_writes_through_a_link_in_its_destination(home, tiny_backbone):
    lora = build_method("lora", None, tiny_backbone, ["a", "b"], ["{}"])
    save_adapter(lora, home / "run/adapter")
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    out = home / "out"
    out.mkdir()
    (out / "peft").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(AdapterError, match=r"would write .*peft/adapter_config.json outside it"):
        export_run(home / "run", out)
    assert os.listdir(elsewhere) == [] and sorted(os.listdir(out)) == ["peft"]


# ------------------------------------------------------------------ pickled checkpoints
class _Payload:
    """Unpickling this runs code: ``open(marker, "w")`` creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


PICKLE_REFUSED = ("holds objects other than tensors and plain values (a pickle payload); adapt "
                  "loads checkpoints weights-only and will not run it")


def _tiny_fit(image_folder, tmp_path, run_name, **extra):
    from adapt.config import load_recipe
    from tests.conftest import tiny_overrides

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    return load_recipe(recipes / "coop/fewshot.yaml",
                       tiny_overrides(image_folder, tmp_path, **{"run_name": run_name, **extra}))


@pytest.fixture(scope="module")
def trained_checkpoint(image_folder, tmp_path_factory) -> Path:
    from adapt.run import run_fit

    tmp = tmp_path_factory.mktemp("ckpt")
    run_fit(_tiny_fit(image_folder, tmp, "run", **{"method.n_ctx": 2}))
    return tmp / "run/checkpoints/last.ckpt"


def _with_payload(ckpt: Path, out: Path, marker: Path) -> Path:
    import torch

    data = torch.load(ckpt, weights_only=True)
    data["callbacks"]["payload"] = _Payload(marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    return out


def test_the_payload_really_runs_when_unpickled(trained_checkpoint, tmp_path):
    import torch

    marker = tmp_path / "ran"
    torch.load(_with_payload(trained_checkpoint, tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()  # so its absence below means it was not run


def test_load_from_checkpoint_refuses_a_pickle_payload_without_running_it(trained_checkpoint, tmp_path):
    from adapt.engine import AdaptModule

    rebuilt = AdaptModule.load_from_checkpoint(trained_checkpoint)  # an adapt checkpoint loads as is
    assert rebuilt.method.name == "coop" and rebuilt.method.prompts.n_ctx == 2
    marker = tmp_path / "ran"
    evil = _with_payload(trained_checkpoint, tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError) as err:
        AdaptModule.load_from_checkpoint(evil)
    assert str(err.value).startswith(f"{evil} {PICKLE_REFUSED}") and "delete the file" in str(err.value)
    assert not marker.exists()


def test_a_slurm_requeue_checkpoint_with_a_pickle_payload_is_refused_on_restart(
        trained_checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    """Lightning's own restart path: under SLURM, fit finds run_dir/hpc_ckpt_*.ckpt by itself and
    restores it through the strategy's checkpoint_io."""
    from adapt.checkpointing import AtomicCheckpointIO

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "adapt-job", "SLURM_JOB_ID": "7",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    reads = []
    real_load = AtomicCheckpointIO.load_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint",
                        lambda self, path, *a, **kw: reads.append(Path(path)) or real_load(self, path, *a, **kw))
    marker = tmp_path / "ran"
    evil = _with_payload(trained_checkpoint, tmp_path / "runs/job/hpc_ckpt_1.ckpt", marker)
    from tests.conftest import tiny_overrides

    recipe = Path(__file__).resolve().parents[1] / "recipes/coop/fewshot.yaml"
    over = tiny_overrides(image_folder, tmp_path / "runs", **{"run_name": "job", "method.n_ctx": 2})
    assert main(["fit", str(recipe), *over]) == 2
    err = capsys.readouterr().err
    assert reads == [evil]  # the trainer's restore reached the file, and stopped there
    assert f"adapt fit: error: {evil} {PICKLE_REFUSED}" in err and "Traceback" not in err
    assert not marker.exists()
