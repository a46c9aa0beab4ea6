"""Model builders: each config of conf/model names one of these dataclasses; `build()` returns a
functional Keras model with named layers (conv1, bn1, ...), so weight paths are stable across runs."""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, require


@dataclass
class ModelSpec:
    name: str = "model"

    def build(self, input_shape: tuple[int, ...], num_classes: int):
        raise NotImplementedError

    @property
    def pretrained(self) -> bool:
        """Is the built model already the trained baseline (evaluated, never trained again)?"""
        return False

    def content(self) -> dict[str, str]:
        """What identifies the model beyond its config (a file's sha256): part of a job's identity."""
        return {}

    def tags(self) -> dict[str, str]:
        """Tags a job's run carries for this model (e.g. an opt-in to unsafe loading)."""
        return {}

    def prepare_loading(self) -> bool:
        """Ready this process to load a saved copy of the model; returns the safe_mode to load it with."""
        return True


def check_fits(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Stop with one line if the model cannot be built for this data (e.g. images too small)."""
    try:
        spec.build(input_shape, num_classes)
    except ConfigError:
        raise
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
    input_size: int | None = None  # images resized to input_size x input_size inside the model

    def __post_init__(self):
        require(self.blocks > 0, "blocks", self.blocks, "an integer > 0")
        require(self.width > 0, "width", self.width, "an integer > 0")
        _size(self.input_size)

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        def conv_bn(x, width, stride, name, relu=True):
            x = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            return layers.ReLU(name=f"{name}_relu")(x) if relu else x

        size = (self.input_size,) * 2 if self.input_size else tuple(input_shape[:2])
        inputs, x = _fitted_input(input_shape, size, input_shape[-1])
        x = conv_bn(x, self.width, 1, "stem")
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


# --- Your own model (model=file) and keras.applications (model=application) ---------------------------

APPLICATIONS = (  # keras.applications' networks (a test checks this list against the installed Keras)
    "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtSmall", "ConvNeXtTiny", "ConvNeXtXLarge", "DenseNet121",
    "DenseNet169", "DenseNet201", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
    "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "EfficientNetV2B0", "EfficientNetV2B1",
    "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2L", "EfficientNetV2M", "EfficientNetV2S",
    "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small",
    "NASNetLarge", "NASNetMobile", "ResNet101", "ResNet101V2", "ResNet152", "ResNet152V2", "ResNet50",
    "ResNet50V2", "VGG16", "VGG19", "Xception")
WIDTH_MULTIPLIED = ("MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small")  # take `alpha`
RESIZE, TO_RGB = "input_resize", "input_rgb"  # the layers that fit the data to the model's input


def _size(input_size: int | None) -> None:
    require(input_size is None or input_size > 0, "input_size", input_size,
            "null (the data's size) or an integer > 0 (images resized to input_size x input_size)")


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


@contextlib.contextmanager
def _fresh_names():
    """Layers Keras names itself (e.g. EfficientNet's `normalization`) get the same names in every build,
    whatever was built before in the process: weights are keyed by path. (Keras keeps the counters in
    its global state; there is no public way to scope them.)"""
    from keras.src.backend.common import global_state

    saved = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", saved)


def _fitted_input(input_shape: tuple[int, ...], size: tuple[int, int], channels: int, name: str = "image"):
    """(keras.Input for the data's images, the tensor the model takes): resized to `size` inside the
    model (a Resizing layer) and, for a model that wants 3 channels from 1, the channel tripled (a
    Concatenate of three copies: no weights, channel-preserving for the dependency graph)."""
    import keras
    from keras import layers

    inputs = keras.Input(input_shape, name=name)
    x = inputs
    if tuple(input_shape[:2]) != tuple(size):
        # training=None, not Resizing's default True, which a call without one would pass on to the layers after
        # it (BatchNorm, Dropout would run in training mode)
        x = layers.Resizing(*size, name=RESIZE)(x, training=None)
    if channels != input_shape[-1]:
        x = layers.Concatenate(axis=-1, name=TO_RGB)([x] * channels)
    return inputs, x


def _gives_probabilities(layer) -> bool:
    """Softmax, Activation("softmax") or any layer with activation="softmax"."""
    return type(layer).__name__ == "Softmax" or getattr(getattr(layer, "activation", None), "__name__", "") == "softmax"


def _copy_weights(source, target) -> None:
    """Each layer of `target` named as one of `source` takes its weights (nested models included)."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def _functional(model):
    """A Sequential model as the equivalent functional one (fresh layers, same names and weights)."""
    import keras

    inputs = keras.Input(batch_shape=model.inputs[0].shape, name="image")
    x = inputs
    for layer in model.layers:
        x = type(layer).from_config(layer.get_config())(x)
    out = keras.Model(inputs, x, name=model.name)
    _copy_weights(model, out)
    return out


def _spliced(model, front):
    """`model` fed by `front` (a functional model: an Input, then the layers that fit the data): the
    model's input layer is replaced by front's layers in the config, so the result is one flat functional
    model with the original layer names and weights."""
    import keras

    cfg, head = model.get_config(), front.get_config()
    refs = cfg["input_layers"]
    old = refs[0] if isinstance(refs[0], str) else refs[0][0]
    new = head["output_layers"][0] if isinstance(head["output_layers"][0], str) else head["output_layers"][0][0]
    taken = {layer["name"] for layer in cfg["layers"]} - {old}
    clash = sorted(taken & {layer["name"] for layer in head["layers"]})
    if clash:
        raise ConfigError(f"the model already has layer(s) named {', '.join(clash)}: the names of the layers "
                          f"that fit the data to it")

    def relink(node):
        if isinstance(node, dict):
            history = node.get("keras_history")
            if history is not None and history[0] == old:
                node["keras_history"] = [new, 0, 0]
            for value in node.values():
                relink(value)
        elif isinstance(node, list | tuple):
            for value in node:
                relink(value)

    rest = [layer for layer in cfg["layers"] if layer["name"] != old]
    for layer in rest:
        relink(layer["inbound_nodes"])
    cfg["layers"], cfg["input_layers"] = head["layers"] + rest, head["input_layers"]
    out = keras.Model.from_config(cfg)
    _copy_weights(model, out)
    return out


def _unsafe_content(path: Path) -> tuple[list[str], list[str]]:
    """(Lambda layers holding Python code, custom classes Keras does not know) in a .keras file's
    config.json, read as JSON: nothing is deserialized. ([], []) for other formats."""
    import keras

    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return [], []
    lambdas, custom = [], []

    def walk(node):
        if isinstance(node, dict):
            registered = node.get("registered_name")
            if node.get("class_name") == "Lambda" and "__lambda__" in json.dumps(node.get("config", {})):
                lambdas.append(str(node.get("config", {}).get("name", "?")))
            elif (isinstance(registered, str) and not str(node.get("module")).startswith("keras")
                  and keras.saving.get_registered_object(registered) is None):
                custom.append(f"{registered} (module {node.get('module')})")
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(config)
    return sorted(set(lambdas)), sorted(set(custom))


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FileModel(ModelSpec):
    """Your own Keras 3 model (functional or Sequential) from a .keras file. trained=true: it is the baseline
    as it is (evaluated, not trained again); false: trained from its weights with training.baseline."""

    name: str = "file"
    path: str | None = None
    trained: bool = True
    safe_mode: bool = True  # false: allow Lambda layers' Python code (trust the file); logged as a tag
    imports: list[str] = field(default_factory=list)  # modules that register the file's custom classes
    input_size: int | None = None

    def __post_init__(self):
        _size(self.input_size)

    @property
    def file(self) -> Path:
        if not self.path:
            raise ConfigError("model=file needs model.path=/abs/path/model.keras")
        path = Path(os.path.expanduser(self.path)).resolve()
        if not path.is_file():
            raise ConfigError(f"model.path={self.path}: no such file (a Keras 3 model saved as .keras)")
        return path

    @property
    def pretrained(self) -> bool:
        return self.trained

    def content(self) -> dict[str, str]:
        stat = self.file.stat()
        return {"sha256": _sha256(str(self.file), stat.st_size, stat.st_mtime_ns)}

    def tags(self) -> dict[str, str]:
        return {} if self.safe_mode else {"model.safe_mode": "false"}

    def prepare_loading(self) -> bool:
        import keras

        for module in self.imports:
            try:
                importlib.import_module(module)
            except Exception as e:
                raise ConfigError(f"model.imports: {module} cannot be imported: {_one_line(e)}") from None
        if not self.safe_mode:  # clone_model and from_config rebuild Lambda layers outside load_model too
            keras.config.enable_unsafe_deserialization()
        return self.safe_mode

    def load(self):
        """The model as saved, after the checks that name what safe loading refuses."""
        import keras

        path, safe = self.file, self.prepare_loading()
        lambdas, custom = _unsafe_content(path)
        if custom:
            modules = sorted({c.split("(module ")[-1].rstrip(")") for c in custom})
            raise ConfigError(f"model.path={self.path} needs custom classes Keras does not know: {', '.join(custom)}; "
                              f"set model.imports=[{','.join(modules)}] (modules that register them with "
                              "@keras.saving.register_keras_serializable)")
        if lambdas and safe:
            raise ConfigError(f"model.path={self.path} has Lambda layer(s) {', '.join(lambdas)}, whose Python code "
                              "safe loading refuses to run; model.safe_mode=false loads them if you trust the file")
        try:
            with _fresh_names():
                return keras.saving.load_model(path, compile=False, safe_mode=safe)
        except Exception as e:
            raise ConfigError(f"model.path={self.path} cannot be loaded: {_one_line(e)}") from None

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        model = self.load()
        if not isinstance(model, keras.Sequential) and "input_layers" not in model.get_config():
            raise ConfigError(f"model.path={self.path}: a {type(model).__name__} (subclassed) model; "
                              "a functional or Sequential model is needed (its layers are what is pruned)")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ConfigError(f"model.path={self.path} has {len(model.inputs)} input(s) and {len(model.outputs)} "
                              "output(s): one image input and one class output are needed")
        want, classes = tuple(model.inputs[0].shape[1:]), model.outputs[0].shape[-1]
        if classes != num_classes:
            raise ConfigError(f"model.path={self.path} outputs {classes} classes; the data has {num_classes}")
        size = (self.input_size,) * 2 if self.input_size else tuple(input_shape[:2])
        fits = len(want) == 3 and all(w in (None, s) for w, s in zip(want[:2], size))
        if not fits or want[2] not in (input_shape[-1], 3 if input_shape[-1] == 1 else None):
            hint = f" (model.input_size={want[0]} resizes them)" if want[0] and not (fits or self.input_size) else ""
            raise ConfigError(f"model.path={self.path} takes inputs of shape {want}; the data's images are "
                              f"{tuple(input_shape)}{' resized to ' + str(size) if self.input_size else ''}{hint}")
        size = tuple(w or s for w, s in zip(want[:2], size))
        with _fresh_names():
            if isinstance(model, keras.Sequential):
                model = _functional(model)
            if size != tuple(input_shape[:2]) or want[2] != input_shape[-1]:
                name = model.inputs[0].name
                model = _spliced(model, keras.Model(*_fitted_input(input_shape, size, want[2], name)))
            if not _gives_probabilities(model.get_layer(model.output_names[0])):  # logits: the loss wants probabilities
                model = keras.Model(model.input, layers.Softmax(name="probabilities")(model.output),
                                    name=model.name)
        return model


@dataclass
class Application(ModelSpec):
    """A keras.applications network without its top, then global average pooling and a softmax Dense
    sized to the data's classes (named `classifier`)."""

    name: str = "application"
    arch: str = "MobileNetV2"
    weights: str | None = None  # null: random (offline); imagenet: downloaded by Keras where the network has them
    alpha: float | None = None  # width multiplier (MobileNet family); null: the network's default
    input_size: int | None = None

    def __post_init__(self):
        require(self.arch in APPLICATIONS, "arch", self.arch, f"one of {', '.join(APPLICATIONS)}")
        require(self.weights in (None, "imagenet"), "weights", self.weights, "null (random) or imagenet")
        require(self.alpha is None or (self.arch in WIDTH_MULTIPLIED and self.alpha > 0), "alpha", self.alpha,
                f"null, or a number > 0 for {', '.join(WIDTH_MULTIPLIED)}")
        _size(self.input_size)

    def build(self, input_shape, num_classes):
        import keras
        from keras import layers

        size = (self.input_size,) * 2 if self.input_size else tuple(input_shape[:2])
        channels = 3 if self.weights else input_shape[-1]  # ImageNet weights take RGB
        extra = {} if self.alpha is None else {"alpha": self.alpha}
        with _fresh_names():
            inputs, x = _fitted_input(input_shape, size, channels)
            try:
                base = getattr(keras.applications, self.arch)(include_top=False, weights=self.weights, input_tensor=x,
                                                              pooling="avg", **extra)
            except ValueError:
                raise  # a shape the network refuses: check_fits names the model and the data
            except Exception as e:  # e.g. the weights cannot be downloaded: Keras's own error, on one line
                raise ConfigError(f"model.arch={self.arch} model.weights={self.weights}: {_one_line(e)}") from None
            outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(base.output)
        return keras.Model(inputs, outputs, name=self.arch)
