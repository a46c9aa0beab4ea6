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


@keras.saving.register_keras_serializable(package="pipeline")  # a compiled model's clone rebuilds its optimizer
class Adam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[i]), v=_handle(self._velocities[i]),
            beta1_power=ops.power(ops.cast(self.beta_1, dtype), step),
            beta2_power=ops.power(ops.cast(self.beta_2, dtype), step), lr=ops.cast(learning_rate, dtype),
            beta1=ops.cast(self.beta_1, dtype), beta2=ops.cast(self.beta_2, dtype),
            epsilon=ops.cast(self.epsilon, dtype), grad=ops.cast(gradient, dtype))


@keras.saving.register_keras_serializable(package="pipeline")
class SGD(keras.optimizers.SGD):
    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if self.momentum == 0 or self.nesterov or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=ops.cast(learning_rate, dtype), grad=ops.cast(gradient, dtype), momentum=ops.cast(self.momentum, dtype))
