"""The pruning pipeline (python -m pipeline.run).

TensorFlow reads its environment once, when first imported, so it is set here, before any module imports
it: quiet logs (TF 2.21 logs harmless tf.data op errors), and oneDNN's CPU kernels, TensorFlow's own
default on x86, which run a small network's convolutions in half the time of Eigen's, with their
gradients' kernels kept for reuse as the forward ones are (TensorFlow rebuilds them on every call by default,
to save memory; a training loop calls them with the same shapes at every step). With oneDNN on,
TensorFlow prints a notice while it loads, through a logger nothing configures yet, so the import of
tensorflow runs with the process's stderr captured and the notice dropped from what it wrote.

Keras, as it loads, imports scikit-learn and matplotlib when they are installed (as here: the
digits data set, the report), for its scikit-learn wrappers and image-gallery plots: a third of its import,
about a second of every process that trains. The pipeline uses neither, so they are hidden while TensorFlow
and Keras load (in that process those two Keras extras then say their package is missing); imported later,
by the pipeline's own code, both load as usual.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_MKL_OPTIMIZE_PRIMITIVE_MEMUSE", "false")  # seed_cnn's step: 0.79 ms, not 0.98

NOTICES = (b"oneDNN custom operations are on", b"All log messages before absl::InitializeLog() is called")
KERAS_EXTRAS = ("sklearn", "matplotlib")  # what Keras imports if it can, and the pipeline never asks of it


@contextlib.contextmanager
def stderr_without(notices):
    """File descriptor 2 goes to a file meanwhile; then its lines are written out, but those with a notice."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            os.write(2, b"".join(line for line in captured if not any(n in line for n in notices)))


@contextlib.contextmanager
def hidden(modules):
    """Importing any of `modules` (those not imported yet) fails meanwhile, as if it were not installed."""
    hide = [m for m in modules if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hide))
    try:
        yield
    finally:
        for m in hide:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


class QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds the first of `tensorflow` and `keras` (each imports the other) once, with a loader that runs it
    under stderr_without(NOTICES) and with KERAS_EXTRAS hidden."""

    def find_spec(self, name, path=None, target=None):
        if name not in ("tensorflow", "keras"):
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                with stderr_without(NOTICES), hidden(KERAS_EXTRAS):
                    load(module)

            spec.loader.exec_module = exec_module  # this spec's own loader
        return spec


if "tensorflow" not in sys.modules and "keras" not in sys.modules:
    sys.meta_path.insert(0, QuietTensorFlow())
