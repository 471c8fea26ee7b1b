"""MNIST, CIFAR-10 and CIFAR-100 from miniature copies written here in the published formats:
CIFAR batches pickled as Python 2's cPickle wrote them (protocol 2, byte strings, numpy arrays),
MNIST as big-endian IDX bytes (plain and gzip)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from adapt.data import DataConfig, build_dataset, few_shot_splits, write_manifest
from adapt.data.checks import check_images
from adapt.data.image_dataset import load_image
from adapt.data.records import source_file
from adapt.data.safe_pickle import UnsafePickleError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_TEMPLATES = 18


# ------------------------------------------------------------------------- file writers ---
class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for CIFAR: ``str`` and ``bytes`` as byte strings (no
    ``_codecs.encode``), numpy under its 1.x name ``numpy.core``: only numpy's names appear."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[str] = _save_string
    dispatch[bytes] = _save_string


def py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def _images(n: int, shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_cifar10(root: Path, per_class: int = 5, test_per_class: int = 2, dump=py2_pickle) -> dict:
    """5 train batches (classes spread over them) + test_batch + batches.meta; returns
    {file: (data rows, labels)} as written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(10), per_class)
    data = _images(len(labels), (3072,), 0)
    written = {}
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        written[f"data_batch_{b}"] = (data[part], labels[part].tolist())
    test_labels = np.tile(np.arange(10), test_per_class)
    written["test_batch"] = (_images(len(test_labels), (3072,), 1), test_labels.tolist())
    for name, (rows, ys) in written.items():
        (folder / name).write_bytes(dump({"batch_label": f"{name} of 5", "labels": ys, "data": rows,
                                          "filenames": [f"img_{i}.png" for i in range(len(ys))]}))
    (folder / "batches.meta").write_bytes(dump({"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES,
                                                "num_vis": 3072}))
    return written


def write_cifar100(root: Path) -> dict:
    from adapt.data.meta import dataset_meta

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [n.replace(" ", "_") for n in dataset_meta("cifar100")["classnames"]]  # the file's spelling
    written = {}
    for split, per_class, seed in (("train", 2, 2), ("test", 1, 3)):
        fine = np.tile(np.arange(100), per_class)
        rows = _images(len(fine), (3072,), seed)
        written[split] = (rows, fine.tolist())
        (folder / split).write_bytes(py2_pickle({"filenames": ["x.png"] * len(fine), "batch_label": split,
                                                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                                 "data": rows}))
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}))
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    magic = {3: 2051, 1: 2049}[array.ndim]
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, per_class: int = 3, test_per_class: int = 2, gz: bool = False) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, k, seed in (("train", per_class, 4), ("t10k", test_per_class, 5)):
        labels = np.tile(np.arange(10, dtype=np.uint8), k)
        images = _images(len(labels), (28, 28), seed)
        written[prefix] = (images, labels)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            (raw / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return written


def load(dataset: str, root: Path, **kw):
    return build_dataset(DataConfig(dataset=dataset, root=str(root), **kw))


def pixels(ds, item) -> np.ndarray:
    return np.asarray(load_image(ds.root / item.path))


def chw_to_hwc(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


# ------------------------------------------------------------------------------ loading ---
def test_the_miniature_genuine_files_name_only_numpy():
    import pickletools

    names = {arg for op, arg, _ in pickletools.genops(py2_pickle({"data": np.zeros((1, 3072), np.uint8),
                                                                  "labels": [0]})) if op.name == "GLOBAL"}
    assert names == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


def test_cifar10_counts_labels_names_templates_and_pixels(tmp_path):
    written = write_cifar10(tmp_path)
    ds = load("cifar10", tmp_path)
    assert ds.root == tmp_path / "cifar-10-batches-py"
    assert ds.classnames == CIFAR10_NAMES
    assert len(ds.templates) == CIFAR_TEMPLATES and ds.templates[0] == "a photo of a {}."
    assert "a photo of the big {}." in ds.templates
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50, 0, 20)
    assert [it.label for it in ds.train] == [y for b in range(1, 6) for y in written[f"data_batch_{b}"][1]]
    assert ds.train[0].path == "data_batch_1#0" and ds.train[-1].path == "data_batch_5#9"
    for item in (ds.train[0], ds.train[13], ds.train[-1], ds.test[7]):
        file, index = item.path.split("#")
        assert np.array_equal(pixels(ds, item), chw_to_hwc(written[file][0][int(index)])), item.path


def test_cifar10_root_may_be_the_batches_folder_itself(tmp_path):
    write_cifar10(tmp_path)
    ds = load("cifar10", tmp_path / "cifar-10-batches-py")
    assert ds.root == tmp_path / "cifar-10-batches-py" and len(ds.train) == 50


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_repacked_by_python3_pickle_loads_the_same(tmp_path, protocol):
    """A copy re-packed with Python 3's pickle (``_codecs.encode`` at protocol 2, ``_frombuffer``
    at 5) is read as the original is."""
    written = write_cifar10(tmp_path, dump=lambda obj: pickle.dumps(obj, protocol=protocol))
    ds = load("cifar10", tmp_path)
    assert len(ds.train) == 50 and np.array_equal(pixels(ds, ds.test[3]), chw_to_hwc(written["test_batch"][0][3]))


def test_cifar100_fine_labels_and_clip_names(tmp_path):
    written = write_cifar100(tmp_path)
    ds = load("cifar100", tmp_path)
    assert len(ds.classnames) == 100 and ds.classnames[1] == "aquarium fish" and ds.classnames[-1] == "worm"
    assert "sweet pepper" in ds.classnames and not any("_" in n for n in ds.classnames)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (200, 0, 100)
    assert [it.label for it in ds.train] == written["train"][1]  # fine, not coarse
    assert ds.test[42].path == "test#42"
    assert np.array_equal(pixels(ds, ds.test[42]), chw_to_hwc(written["test"][0][42]))
    assert len(ds.templates) == CIFAR_TEMPLATES


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_counts_labels_names_and_grey_pixels_in_three_channels(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    ds = load("mnist", tmp_path)
    assert ds.classnames == [str(i) for i in range(10)]
    assert ds.templates == ['a photo of the number: "{}".']
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 0, 20)
    assert [it.label for it in ds.test] == written["t10k"][1].tolist()
    suffix = ".gz" if gz else ""
    assert ds.train[4].path == f"raw/train-images-idx3-ubyte{suffix}#4"
    image = pixels(ds, ds.train[4])
    assert image.shape == (28, 28, 3)
    for channel in range(3):
        assert np.array_equal(image[..., channel], written["train"][0][4])


def test_mnist_prefers_the_plain_file_when_both_are_there(tmp_path):
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    for f in list(raw.iterdir()):
        (raw / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    assert load("mnist", tmp_path / "MNIST").train[0].path == "raw/train-images-idx3-ubyte#0"


# ------------------------------------------------------- few-shot, manifests, one data path ---
def test_few_shot_sample_and_a_manifest_rerun_give_the_same_images(tmp_path):
    write_cifar10(tmp_path / "data")
    ds = load("cifar10", tmp_path / "data")
    train, val = few_shot_splits(ds, 2, seed=1)
    assert len(train) == 20 and val == []  # no validation split
    assert sorted(sum(1 for it in train if it.label == c) for c in range(10)) == [2] * 10
    assert few_shot_splits(ds, 2, seed=2)[0] != train
    manifest = write_manifest(tmp_path / "run" / "manifest.json", ds.name, ds.classnames, train, val, 2, 1, "all")
    stored = json.loads(manifest.read_text())["train"]
    assert all("#" in p and not os.path.isabs(p) and str(tmp_path) not in p for p, _ in stored)
    # the same data elsewhere: the manifest's relative paths name the same records
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    again = load("cifar10", moved)
    rerun, _ = few_shot_splits(again, 2, seed=99, manifest=manifest)
    assert rerun == train
    for a, b in zip(train, rerun):
        assert np.array_equal(pixels(again, b), np.asarray(load_image(moved / "cifar-10-batches-py" / a.path)))


def test_each_file_is_read_once_per_process(tmp_path, monkeypatch):
    import adapt.data.cifar_batch as cifar_batch

    calls = []
    real = cifar_batch.load_pickle
    monkeypatch.setattr(cifar_batch, "load_pickle", lambda path: calls.append(Path(path).name) or real(path))
    write_cifar10(tmp_path)
    ds = load("cifar10", tmp_path)
    for _ in range(2):
        for item in ds.train + ds.test:
            load_image(ds.root / item.path)
    assert sorted(calls) == sorted(["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])


def test_image_checks_and_feature_cache_stamps_read_records(tmp_path):
    write_cifar10(tmp_path)
    ds = load("cifar10", tmp_path)
    kept = check_images(ds.root, {"train": ds.train, "test": ds.test})
    assert kept == {"train": ds.train, "test": ds.test}
    assert source_file(ds.root / "data_batch_2#3") == ds.root / "data_batch_2"
    with pytest.raises(FileNotFoundError, match=r"do not exist.*data_batch_9#0"):
        check_images(ds.root, {"train": [type(ds.train[0])("data_batch_9#0", 0)]})
    with pytest.raises(ValueError, match=r"holds 20 images, so record #20 does not exist"):
        check_images(ds.root, {"test": [type(ds.test[0])("test_batch#20", 0)]})


# ------------------------------------------------------------------------------ bad input ---
def test_a_missing_file_names_the_expected_layout(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 is missing; expected root/cifar-10-batches-py/\{data_batch_1"):
        load("cifar10", tmp_path)
    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) is missing; "
                                                 r"expected root/MNIST/raw/"):
        load("mnist", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{train, test, meta\}"):
        load("cifar100", tmp_path / "m")


def test_mnist_wrong_magic_swapped_files_and_truncation(tmp_path):
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(struct.pack(">i", 1234) + good[4:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte has magic number 1234, not MNIST's 2051"):
        load("mnist", tmp_path)
    images.write_bytes((raw / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match=r"holds labels \(magic 2049\) where MNIST's images file \(magic 2051\) belongs"):
        load("mnist", tmp_path)
    images.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is truncated: its header announces images of shape "
                                         r"\[30, 28, 28\] \(23520 bytes\) but it holds 23420; download it again"):
        load("mnist", tmp_path)
    images.write_bytes(good[:10])
    with pytest.raises(ValueError, match=r"truncated inside its header \(10 of 16 bytes\)"):
        load("mnist", tmp_path)
    images.write_bytes(gzip.compress(good)[:-30])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is a damaged gzip file"):
        load("mnist", tmp_path)


def test_mnist_label_count_mismatch_names_both_files(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte holds 20 images but .*t10k-labels-idx1-ubyte holds 19"):
        load("mnist", tmp_path)
    labels.write_bytes(idx_bytes(np.full(20, 10, np.uint8)))
    with pytest.raises(ValueError, match=r"record 0 has label 10, outside 0..9 \(20 such records\)"):
        load("mnist", tmp_path)


def test_cifar_label_count_mismatch_bad_data_and_reordered_meta(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    rows = np.zeros((4, 3072), np.uint8)
    (folder / "test_batch").write_bytes(py2_pickle({"data": rows, "labels": [0, 1, 2]}))
    with pytest.raises(ValueError, match=r"test_batch holds 4 images but 3 'labels'"):
        load("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle({"data": rows.reshape(4, 32, 96), "labels": [0] * 4}))
    with pytest.raises(ValueError, match=r"'data' must be an N x 3072 uint8 array .* got uint8 array of shape \[4, 32, 96\]"):
        load("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle({"data": rows, "labels": [0] * 4})[:-20])
    with pytest.raises(ValueError, match=r"test_batch is not a readable pickle"):
        load("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle({"data": rows, "labels": [0] * 4}))
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": CIFAR10_NAMES[::-1]}))
    with pytest.raises(ValueError, match=r"batches.meta lists 10 classes that differ .* first at label 0: 'truck' vs 'airplane'"):
        load("cifar10", tmp_path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_asking_for_os_system_is_refused_without_running_it(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    payload = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Evil(marker)}, protocol=2)
    assert b"system" in payload
    batch.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as err:
        load("cifar10", tmp_path)
    assert str(batch) in str(err.value) and f"{os.system.__module__}.system" in str(err.value)
    assert "nothing in the file was run" in str(err.value)
    assert not marker.exists()


def test_the_codecs_name_a_repack_needs_encodes_only_latin1(tmp_path):
    file = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_cifar10(tmp_path)
    # _codecs.encode('abc', 'rot13'): allowed name, refused codec
    file.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match=r"test_batch is not a readable pickle .*only latin1 is allowed"):
        load("cifar10", tmp_path)


# ------------------------------------------------------------------------------ end to end ---
def test_zero_shot_recipe_on_a_miniature_cifar10(tmp_path):
    from adapt.config import load_recipe
    from adapt.run import run_fit
    from tests.conftest import tiny_overrides

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    write_cifar10(tmp_path / "data", per_class=4, test_per_class=3)
    over = tiny_overrides(tmp_path / "data", tmp_path / "runs", "zeroshot", **{
        "data.dataset": "cifar10", "method.ensemble": "true", "trainer.max_epochs": 0, "run_name": "zs"})
    res = run_fit(load_recipe(recipes / "data/cifar10.yaml", over))
    saved = json.loads((tmp_path / "runs" / "zs" / "results.json").read_text())
    assert saved["metrics"]["test_acc"] == pytest.approx(res["metrics"]["test_acc"])
    assert 0.0 <= saved["metrics"]["test_acc"] <= 100.0
    manifest = json.loads((tmp_path / "runs" / "zs" / "manifest.json").read_text())
    assert manifest["dataset"] == "cifar10" and manifest["classnames"] == CIFAR10_NAMES
    assert len(manifest["train"]) == 40 and all(p.startswith("data_batch_") for p, _ in manifest["train"])
