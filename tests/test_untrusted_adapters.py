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
