"""Keras's Adam and SGD with momentum, each variable's update as one TensorFlow op.

Keras 3 writes an update as a dozen small ops per variable (Adam: the moments, the bias correction, the
step); TensorFlow's fused kernels (ResourceApplyAdam, ResourceApplyKerasMomentum) compute the very same
formulas in one op, which takes a tenth off a small network's training step. Sparse gradients, amsgrad and
Nesterov momentum keep Keras's own update.
"""

from __future__ import annotations

import keras
from keras import ops


def _handle(variable):
    import tensorflow as tf

    return variable.handle if isinstance(variable, tf.Variable) else variable.value.handle


class _StepScalars:
    """The scalars every variable's update takes (learning rate, betas, bias corrections), made once per
    optimizer step rather than once per variable: a dozen variables' casts and powers are a tenth of seed_cnn's
    small ops."""

    _step: dict | None = None

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        self._step = {}
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._step = None

    def shared(self, dtype, learning_rate) -> dict:
        if self._step is None:  # an update outside a whole step
            return self.scalars(dtype, learning_rate)
        if dtype not in self._step:
            self._step[dtype] = self.scalars(dtype, learning_rate)
        return self._step[dtype]


@keras.saving.register_keras_serializable(package="pipeline")  # a compiled model's clone rebuilds its optimizer
class Adam(_StepScalars, keras.optimizers.Adam):
    def scalars(self, dtype, learning_rate) -> dict:
        step = ops.cast(self.iterations + 1, dtype)
        beta1, beta2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        return {"beta1_power": ops.power(beta1, step), "beta2_power": ops.power(beta2, step),
                "lr": ops.cast(learning_rate, dtype), "beta1": beta1, "beta2": beta2,
                "epsilon": ops.cast(self.epsilon, dtype)}

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(var=_handle(variable), m=_handle(self._momentums[i]),
                                     v=_handle(self._velocities[i]), grad=ops.cast(gradient, variable.dtype),
                                     **self.shared(variable.dtype, learning_rate))


@keras.saving.register_keras_serializable(package="pipeline")
class SGD(_StepScalars, keras.optimizers.SGD):
    def scalars(self, dtype, learning_rate) -> dict:
        return {"lr": ops.cast(learning_rate, dtype), "momentum": ops.cast(self.momentum, dtype)}

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if self.momentum == 0 or self.nesterov or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
            grad=ops.cast(gradient, variable.dtype), **self.shared(variable.dtype, learning_rate))
