"""Keras 2 (tf_keras) `.h5` files with layers whose configs Keras 3 refuses on its own
(compressor.io.legacy_layers): each loads as plain Keras 3 layers computing the same outputs as
tf_keras (within 1e-5: float32 kernels run by two implementations), and a setting Keras 3
cannot reproduce fails in one line."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import ModelLoadError
from compressor.io.models import load_model
from conftest import raises_as_cli


def _tf_keras():
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    return tf_keras, tf_keras.layers


def _single(shape, make):
    def build():
        tf_keras, layers = _tf_keras()
        inputs = tf_keras.Input(shape)
        return tf_keras.Model(inputs, make(layers)(inputs))
    return build


def _attention():
    tf_keras, layers = _tf_keras()
    query, value = tf_keras.Input((5, 4)), tf_keras.Input((3, 6))
    attended = layers.MultiHeadAttention(2, 3)(query, value, key=value)  # tensors passed by keyword
    return tf_keras.Model([query, value], layers.LayerNormalization()(attended))


CASES = {
    "SeparableConv2D": _single((8, 8, 3), lambda layers: layers.SeparableConv2D(4, 3, depth_multiplier=2)),
    "SeparableConv1D": _single((8, 3), lambda layers: layers.SeparableConv1D(4, 3)),
    "DepthwiseConv2D": _single((8, 8, 3), lambda layers: layers.DepthwiseConv2D(3)),
    "Conv2DTranspose": _single((8, 8, 3), lambda layers: layers.Conv2DTranspose(4, 3, strides=2)),
    "LSTM": _single((5, 3), lambda layers: layers.LSTM(4)),
    "GRU": _single((5, 3), lambda layers: layers.GRU(4, return_sequences=True)),
    "Bidirectional": _single((5, 3), lambda layers: layers.Bidirectional(layers.LSTM(4), merge_mode="sum")),
    "MultiHeadAttention": _attention,
}


@pytest.mark.parametrize("case", CASES)
def test_keras2_h5_loads_as_keras3_layers_with_the_same_outputs(tmp_path, case):
    import keras

    legacy = CASES[case]()
    legacy.save(tmp_path / "legacy.h5", save_format="h5")
    loaded = load_model(tmp_path / "legacy.h5")
    assert loaded.count_params() == legacy.count_params()
    found = {type(layer).__name__: type(layer) for layer in loaded.layers}
    assert found[case] is getattr(keras.layers, case)  # the plain Keras 3 class, not a loader's subclass
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(2, *tensor.shape[1:])).astype(np.float32) for tensor in legacy.inputs]
    np.testing.assert_allclose(np.asarray(loaded(x)), legacy.predict(x, verbose=0), atol=1e-5)


def test_a_keras2_setting_keras3_lacks_fails_in_one_line(tmp_path):
    legacy = _single((5, 3), lambda layers: layers.LSTM(4, time_major=True))()
    legacy.save(tmp_path / "legacy.h5", save_format="h5")
    with raises_as_cli(ModelLoadError, r"^layer 'lstm\w*' \(LSTM\) has time_major=True, a Keras 2 setting Keras 3 "
                                       r"does not have \(only time_major=False loads\): re-save the model without it$"):
        load_model(tmp_path / "legacy.h5")
