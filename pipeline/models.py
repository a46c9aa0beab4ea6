"""Model builders: each config of conf/model names one of these dataclasses; `build()` returns a
functional Keras model with named layers (conv1, bn1, ...), so weight paths are stable across runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, require


@dataclass
class ModelSpec:
    name: str = "model"

    def build(self, input_shape: tuple[int, ...], num_classes: int):
        raise NotImplementedError


def check_fits(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Stop with one line if the model cannot be built for this data (e.g. images too small)."""
    try:
        spec.build(input_shape, num_classes)
    except ValueError as e:
        raise ConfigError(f"model={spec.name} does not fit images of shape {input_shape}: "
                          f"{' '.join(str(e).split())}") from None


def _check_padding(padding: str) -> None:
    require(padding in ("same", "valid"), "padding", padding, "same or valid")


@dataclass
class SeedCNN(ModelSpec):
    """The study's network: 4 Conv2D layers of 3 filters (3x3, ReLU), Flatten, Dense, classifier."""

    name: str = "seed_cnn"
    conv_layers: int = 4
    filters: int = 3
    kernel_size: int = 3
    hidden: int = 64
    padding: str = "same"

    def __post_init__(self):
        for key in ("conv_layers", "filters", "kernel_size", "hidden"):
            require(getattr(self, key) > 0, key, getattr(self, key), "an integer > 0")
        _check_padding(self.padding)

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        inputs = keras.Input(input_shape, name="image")
        x = inputs
        for i in range(1, self.conv_layers + 1):
            x = layers.Conv2D(self.filters, self.kernel_size, padding=self.padding, activation="relu",
                              name=f"conv{i}")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(self.hidden, activation="relu", name="dense1")(x)
        outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
        return keras.Model(inputs, outputs, name=self.name)


@dataclass
class VGGBN(ModelSpec):
    """A small VGG-style network with BatchNorm after every conv; max-pooling after the listed convs."""

    name: str = "vgg_bn"
    widths: list[int] = field(default_factory=lambda: [32, 32, 64, 64])
    pool_after: list[int] = field(default_factory=lambda: [2])
    hidden: int = 128
    padding: str = "same"

    def __post_init__(self):
        require(len(self.widths) > 0 and min(self.widths) > 0, "widths", self.widths, "a list of integers > 0")
        require(all(1 <= p <= len(self.widths) for p in self.pool_after), "pool_after", self.pool_after,
                f"conv indices in 1..{len(self.widths)}")
        require(self.hidden > 0, "hidden", self.hidden, "an integer > 0")
        _check_padding(self.padding)

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        inputs = keras.Input(input_shape, name="image")
        x = inputs
        for i, width in enumerate(self.widths, start=1):
            x = layers.Conv2D(width, 3, padding=self.padding, use_bias=False, name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU(name=f"relu{i}")(x)
            if i in self.pool_after:
                x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(self.hidden, activation="relu", name="dense1")(x)
        outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
        return keras.Model(inputs, outputs, name=self.name)


@dataclass
class ResNet(ModelSpec):
    """A CIFAR-style ResNet (He et al. 2016): 3 stages of `blocks` basic blocks, widths w, 2w, 4w.
    depth = 6 * blocks + 2 (ResNet-20 is blocks=3, width=16)."""

    name: str = "resnet"
    blocks: int = 3
    width: int = 16

    def __post_init__(self):
        require(self.blocks > 0, "blocks", self.blocks, "an integer > 0")
        require(self.width > 0, "width", self.width, "an integer > 0")

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        def conv_bn(x, width, stride, name, relu=True):
            x = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            return layers.ReLU(name=f"{name}_relu")(x) if relu else x

        inputs = keras.Input(input_shape, name="image")
        x = conv_bn(inputs, self.width, 1, "stem")
        for stage in range(3):
            width = self.width * 2**stage
            for block in range(self.blocks):
                name = f"s{stage + 1}b{block + 1}"
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = x
                y = conv_bn(x, width, stride, f"{name}_1")
                y = conv_bn(y, width, 1, f"{name}_2", relu=False)
                if stride != 1 or shortcut.shape[-1] != width:
                    shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
                    shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
                x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
        x = layers.GlobalAveragePooling2D(name="gap")(x)
        outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
        return keras.Model(inputs, outputs, name=self.name)
