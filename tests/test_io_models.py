"""Loading models from every supported format, and the errors for what is not supported."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from compressor.errors import ModelLoadError
from compressor.io.models import import_custom_objects, load_model, save_model
from conftest import build_nested, build_residual, build_sequential, raises_as_cli


def _same_outputs(a, b, shape, atol=1e-6):
    x = np.random.default_rng(1).random((3, *shape), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=atol)


@pytest.mark.parametrize("builder", [build_sequential, build_residual, build_nested])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files_load_with_same_outputs(tmp_path, builder, suffix):
    model = builder()
    path = tmp_path / f"m{suffix}"
    model.save(path)
    loaded = load_model(path)
    assert loaded.count_params() == model.count_params()
    _same_outputs(model, loaded, model.inputs[0].shape[1:])


def test_nested_model_keeps_inner_model(tmp_path):
    import keras

    path = save_model(build_nested(), tmp_path / "nested.keras")
    loaded = load_model(path)
    assert any(isinstance(layer, keras.Model) for layer in loaded.layers)


def _legacy_model():
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 2))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(3, activation="softmax")(x)
    return tf_keras.Model(inputs, outputs)


def test_legacy_tf_keras_h5_loads(tmp_path):
    legacy = _legacy_model()
    legacy.save(tmp_path / "legacy.h5", save_format="h5")
    loaded = load_model(tmp_path / "legacy.h5")
    assert loaded.count_params() == legacy.count_params()
    _same_outputs(legacy, loaded, (8, 8, 2), atol=1e-5)


def test_legacy_tf_keras_savedmodel_loads(tmp_path):
    legacy = _legacy_model()
    legacy.save(tmp_path / "saved", save_format="tf")
    loaded = load_model(tmp_path / "saved")
    assert loaded.count_params() == legacy.count_params()
    _same_outputs(legacy, loaded, (8, 8, 2), atol=1e-5)


def test_savedmodel_without_keras_metadata_is_refused(tmp_path):
    model = build_sequential()
    model.export(tmp_path / "exported", verbose=False)
    with pytest.raises(ModelLoadError, match="without Keras metadata"):
        load_model(tmp_path / "exported")


def test_folder_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        load_model(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        load_model(tmp_path / "absent.keras")


@pytest.mark.parametrize("name", ["bad.keras", "bad.h5"])
def test_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a valid"):
        load_model(tmp_path / name)


def test_unknown_extension(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="expected a .keras or .h5"):
        load_model(tmp_path / "model.pt")


CUSTOM_MODULE = textwrap.dedent(
    """
    import keras

    @keras.saving.register_keras_serializable(package="{pkg}")
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {{**super().get_config(), "factor": self.factor}}

    @keras.saving.register_keras_serializable(package="{pkg}")
    class Sub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)
    """
)


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A user module registering a custom layer and a subclassed model, importable by name."""
    import uuid

    name = f"user_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CUSTOM_MODULE.format(pkg=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


def test_custom_objects_module_registers_layers(tmp_path, custom_module):
    import importlib

    import keras

    module = importlib.import_module(custom_module)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(module.Scale(3.0)(inputs)))
    model.save(tmp_path / "custom.keras")
    # A fresh process would not know the class; simulate by unregistering it (only it: the
    # package's own registered layers stay, as they would in that process).
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_OBJECTS.pop(f"{custom_module}>Scale", None)
    object_registration.GLOBAL_CUSTOM_NAMES.pop(module.Scale, None)
    with raises_as_cli(ModelLoadError, "not registered: pass --custom-objects"):
        load_model(tmp_path / "custom.keras")
    import sys

    del sys.modules[custom_module]
    loaded = load_model(tmp_path / "custom.keras", custom_objects=[custom_module])
    _same_outputs(model, loaded, (4,))


def test_custom_objects_module_missing():
    with pytest.raises(ModelLoadError, match="could not import custom-objects module 'no_such_mod_xyz'"):
        load_model("whatever.keras", custom_objects=["no_such_mod_xyz"])


def test_subclassed_model_is_refused(tmp_path, custom_module):
    import importlib

    module = importlib.import_module(custom_module)
    model = module.Sub()
    model(np.zeros((1, 3), np.float32))
    model.save(tmp_path / "sub.keras")
    with pytest.raises(ModelLoadError, match="subclassed model \\(Sub\\).*Functional API"):
        load_model(tmp_path / "sub.keras")


def test_save_model_is_atomic_and_checks_suffix(tmp_path):
    model = build_sequential()
    target = save_model(model, tmp_path / "out.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"]  # no temporary left
    assert load_model(target).count_params() == model.count_params()
    with pytest.raises(ModelLoadError, match="saved as .keras"):
        save_model(model, tmp_path / "out.h5")


# --- damaged files: the message names the damaged part ---------------------------------------


def _members(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _zip(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("intact") / "model.keras"
    build_sequential().save(path)
    return path


def test_keras_archive_with_a_truncated_weights_file(keras_file, tmp_path):
    members = _members(keras_file)
    members["model.weights.h5"] = members["model.weights.h5"][: len(members["model.weights.h5"]) // 2]
    path = _zip(tmp_path / "model.keras", members)
    with pytest.raises(ModelLoadError, match=r"model.keras is corrupt: its weights file model.weights.h5 is truncated or unreadable \(truncated file"):
        load_model(path)


def test_keras_archive_with_broken_json(keras_file, tmp_path):
    members = _members(keras_file)
    members["config.json"] = b'{"module": "keras", "class_name": "Sequential", "config": {' + b"]"
    path = _zip(tmp_path / "model.keras", members)
    with pytest.raises(ModelLoadError, match=r"model.keras is corrupt: its config.json is not valid JSON \(line 1, column 60\)"):
        load_model(path)
    del members["config.json"]
    with pytest.raises(ModelLoadError, match="model.keras is corrupt: it has no config.json"):
        load_model(_zip(tmp_path / "model.keras", members))


def test_keras_archive_member_failing_its_crc(keras_file, tmp_path):
    import zipfile

    raw = bytearray(keras_file.read_bytes())
    with zipfile.ZipFile(keras_file) as archive:
        info = archive.getinfo("model.weights.h5")
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 2000] ^= 0xFF  # inside the stored data
    (tmp_path / "model.keras").write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="model.keras is corrupt: its member model.weights.h5 fails its CRC check"):
        load_model(tmp_path / "model.keras")


def test_truncated_keras_archive_and_h5_file(keras_file, tmp_path):
    raw = keras_file.read_bytes()
    (tmp_path / "cut.keras").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match="not a valid .keras file \\(not a zip archive, or a truncated one\\)"):
        load_model(tmp_path / "cut.keras")
    build_sequential().save(tmp_path / "whole.h5")
    raw = (tmp_path / "whole.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match=r"cut.h5 is corrupt: the HDF5 file is truncated or unreadable \(truncated file"):
        load_model(tmp_path / "cut.h5")


def test_model_file_checks_import_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from compressor.io.model_files import check_model_path\n"
        "try:\n    check_model_path('absent.keras')\nexcept Exception as exc:\n    print(exc)\n"
        "print([m for m in ('tensorflow', 'keras') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["model not found: absent.keras", "[]"], out.stderr


# --- code stored in the model runs only when allowed --------------------------------------------


def _write_marker(x):
    """A Lambda's function that leaves a file behind when it runs (bytecode in the saved model)."""
    import os
    import pathlib

    marker = os.environ.get("COMPRESSOR_TEST_LAMBDA_MARKER")
    if marker:
        pathlib.Path(marker).write_text("the Lambda ran")
    return x * 2.0


def _lambda_savedmodel(folder, nested=False):
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.Dense(3)(inputs)
    if nested:
        inner = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Lambda(_write_marker, name="marker")], name="inner")
        x = inner(x)
    else:
        x = tf_keras.layers.Lambda(_write_marker, name="marker")(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2)(x))
    model.save(folder, save_format="tf")
    return model


@pytest.mark.parametrize("nested", [False, True])
def test_savedmodel_lambda_does_not_run_without_allow_model_code(tmp_path, monkeypatch, nested):
    _lambda_savedmodel(tmp_path / "saved", nested=nested)
    marker = tmp_path / "ran"
    monkeypatch.setenv("COMPRESSOR_TEST_LAMBDA_MARKER", str(marker))
    with raises_as_cli(ModelLoadError, r"stores Python code in layer marker \(Lambda\).*pass --allow-model-code"):
        load_model(tmp_path / "saved")
    assert not marker.exists()  # refused before tf_keras turned the bytecode into a function


def test_savedmodel_lambda_loads_with_allow_model_code(tmp_path, monkeypatch):
    legacy = _lambda_savedmodel(tmp_path / "saved")
    marker = tmp_path / "ran"
    monkeypatch.setenv("COMPRESSOR_TEST_LAMBDA_MARKER", str(marker))
    loaded = load_model(tmp_path / "saved", allow_model_code=True)
    assert marker.exists()  # the opt-in is what let the stored code run
    _same_outputs(legacy, loaded, (4,), atol=1e-5)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_lambda_is_refused_naming_the_flag_and_loads_with_it(tmp_path, suffix):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2.0)(inputs)))
    model.save(tmp_path / f"m{suffix}")
    with raises_as_cli(ModelLoadError, r"stores Python code that would run on loading .*refused: pass --allow-model-code"):
        load_model(tmp_path / f"m{suffix}")
    _same_outputs(model, load_model(tmp_path / f"m{suffix}", allow_model_code=True), (4,))


def test_a_stray_module_in_the_working_folder_does_not_shadow_an_installed_one(tmp_path, monkeypatch):
    """--custom-objects can import from the working folder, but after everything installed."""
    import importlib
    import sys
    import uuid

    name = f"layers_{uuid.uuid4().hex[:8]}"
    site, work = tmp_path / "site", tmp_path / "work"
    site.mkdir()
    work.mkdir()
    (site / f"{name}.py").write_text("SOURCE = 'installed'\n")
    (work / f"{name}.py").write_text("raise RuntimeError('the stray file ran')\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(site), *(p for p in sys.path if p not in ("", str(work)))])
    importlib.invalidate_caches()
    import_custom_objects([name])
    assert sys.modules.pop(name).SOURCE == "installed" and sys.path[-1] == str(work)
