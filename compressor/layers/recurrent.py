"""Recurrent cells whose input and recurrent kernels are stored as low-rank factor pairs.

`LowRankLSTMCell`, `LowRankGRUCell` and `LowRankSimpleRNNCell` compute what the Keras
cells they extend compute, with the input kernel W (Cin, G·u) and the recurrent
kernel U (u, G·u) (G gates: 4, 3, 1) each either whole or a product A·B through a
rank r: per time step `x·A·B` costs r·(Cin + G·u) multiply-accumulates instead of
Cin·G·u. The products are taken vector by vector (never A·B itself), so a converter
that folds constants keeps the factors and the artifact stays small. A factored
kernel is the weight pair `<name>_in` (rows, r), `<name>_out` (r, G·u).

They run inside a plain `keras.layers.RNN`, so TFLite and ONNX get the same while
loop as for the Keras recurrent layers (`compressor.export.writers.tflite_model`).
Only GRU's default `reset_after=True` form is supported. The cells are registered
Keras objects ("compressor>LowRankLSTMCell", ...): a compressed `.keras` file loads
wherever this module has been imported (`compressor.io.models.load_model` does it).
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

GATES = {"LSTMCell": 4, "GRUCell": 3, "SimpleRNNCell": 1}


class _LowRankKernels:
    """Build and apply the two kernels, each whole (rank None) or as a factor pair."""

    def __init__(
        self, units: int, input_rank: Optional[int] = None, recurrent_rank: Optional[int] = None, **kwargs: Any
    ) -> None:
        super().__init__(units, **kwargs)
        self.input_rank, self.recurrent_rank = input_rank, recurrent_rank

    def _add_kernels(self, features: int, gates: int) -> None:
        self._input = self._kernel("kernel", features, gates, self.input_rank, "kernel")
        self._recurrent = self._kernel("recurrent_kernel", self.units, gates, self.recurrent_rank, "recurrent")

    def _kernel(self, name: str, rows: int, cols: int, rank: Optional[int], kind: str) -> tuple:
        settings = dict(
            initializer=getattr(self, f"{kind}_initializer"),
            regularizer=getattr(self, f"{kind}_regularizer"),
            constraint=getattr(self, f"{kind}_constraint"),
        )
        if rank is None:
            return (self.add_weight(shape=(rows, cols), name=name, **settings),)
        return (
            self.add_weight(shape=(rows, rank), name=f"{name}_in", **settings),
            self.add_weight(shape=(rank, cols), name=f"{name}_out", **settings),
        )

    @staticmethod
    def _apply(x: Any, factors: tuple) -> Any:
        for factor in factors:
            x = ops.matmul(x, factor)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "input_rank": self.input_rank, "recurrent_rank": self.recurrent_rank}


@keras.saving.register_keras_serializable(package="compressor")
class LowRankLSTMCell(_LowRankKernels, keras.layers.LSTMCell):
    """An LSTMCell with optionally factored kernels (module docstring).

    Args:
        units: As LSTMCell.
        input_rank: Rank of the input kernel's factors; None: one whole kernel.
        recurrent_rank: Rank of the recurrent kernel's factors; None: whole.
        **kwargs: LSTMCell's other arguments.
    """

    def build(self, input_shape: Any) -> None:
        self._add_kernels(input_shape[-1], 4 * self.units)
        self.bias = (
            self.add_weight(shape=(4 * self.units,), name="bias", initializer=self.bias_initializer,
                            regularizer=self.bias_regularizer, constraint=self.bias_constraint)
            if self.use_bias else None
        )  # fmt: skip
        self.built = True

    def call(self, inputs: Any, states: Any, training: bool = False) -> Any:
        h_tm1, c_tm1 = states[0], states[1]
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        z = self._apply(inputs, self._input) + self._apply(h_tm1, self._recurrent)
        if self.use_bias:
            z = z + self.bias
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=1)
        i, f, o = self.recurrent_activation(z_i), self.recurrent_activation(z_f), self.recurrent_activation(z_o)
        c = f * c_tm1 + i * self.activation(z_c)
        h = o * self.activation(c)
        return h, [h, c]


@keras.saving.register_keras_serializable(package="compressor")
class LowRankGRUCell(_LowRankKernels, keras.layers.GRUCell):
    """A GRUCell (reset_after=True) with optionally factored kernels (module docstring).

    Args:
        units: As GRUCell.
        input_rank: Rank of the input kernel's factors; None: one whole kernel.
        recurrent_rank: Rank of the recurrent kernel's factors; None: whole.
        **kwargs: GRUCell's other arguments.

    Raises:
        ValueError: reset_after=False.
    """

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(units, **kwargs)
        if not self.reset_after:
            raise ValueError("LowRankGRUCell supports reset_after=True only. Received: reset_after=False")

    def build(self, input_shape: Any) -> None:
        self._add_kernels(input_shape[-1], 3 * self.units)
        self.bias = (
            self.add_weight(shape=(2, 3 * self.units), name="bias", initializer=self.bias_initializer,
                            regularizer=self.bias_regularizer, constraint=self.bias_constraint)
            if self.use_bias else None
        )  # fmt: skip
        self.built = True

    def call(self, inputs: Any, states: Any, training: bool = False) -> Any:
        h_tm1 = states[0] if keras.tree.is_nested(states) else states
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        matrix_x = self._apply(inputs, self._input)
        matrix_inner = self._apply(h_tm1, self._recurrent)
        if self.use_bias:
            matrix_x = matrix_x + self.bias[0]
            matrix_inner = matrix_inner + self.bias[1]
        x_z, x_r, x_h = ops.split(matrix_x, 3, axis=-1)
        recurrent_z, recurrent_r, recurrent_h = ops.split(matrix_inner, 3, axis=-1)
        z = self.recurrent_activation(x_z + recurrent_z)
        r = self.recurrent_activation(x_r + recurrent_r)
        hh = self.activation(x_h + r * recurrent_h)
        h = z * h_tm1 + (1 - z) * hh
        return h, [h] if keras.tree.is_nested(states) else h


@keras.saving.register_keras_serializable(package="compressor")
class LowRankSimpleRNNCell(_LowRankKernels, keras.layers.SimpleRNNCell):
    """A SimpleRNNCell with optionally factored kernels (module docstring).

    Args:
        units: As SimpleRNNCell.
        input_rank: Rank of the input kernel's factors; None: one whole kernel.
        recurrent_rank: Rank of the recurrent kernel's factors; None: whole.
        **kwargs: SimpleRNNCell's other arguments.
    """

    def build(self, input_shape: Any) -> None:
        self._add_kernels(input_shape[-1], self.units)
        self.bias = (
            self.add_weight(shape=(self.units,), name="bias", initializer=self.bias_initializer,
                            regularizer=self.bias_regularizer, constraint=self.bias_constraint)
            if self.use_bias else None
        )  # fmt: skip
        self.built = True

    def call(self, inputs: Any, states: Any, training: bool = False) -> Any:
        prev_output = states[0] if isinstance(states, (list, tuple)) else states
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        h = self._apply(inputs, self._input)
        if self.use_bias:
            h = h + self.bias
        output = h + self._apply(prev_output, self._recurrent)
        if self.activation is not None:
            output = self.activation(output)
        return output, [output] if isinstance(states, (list, tuple)) else output
