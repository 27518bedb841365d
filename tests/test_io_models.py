"""Loading models from every supported format, and the errors for what is not supported."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from compressor.errors import ModelLoadError
from compressor.io.models import load_model, save_model
from conftest import build_nested, build_residual, build_sequential


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
    keras.saving.get_custom_objects().clear()
    # A fresh process would not know the class; simulate by unregistering it.
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_OBJECTS.pop(f"{custom_module}>Scale", None)
    object_registration.GLOBAL_CUSTOM_NAMES.pop(module.Scale, None)
    with pytest.raises(ModelLoadError, match="not registered: pass --custom-objects"):
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
