"""The pruning pipeline (python -m pipeline.run).

TensorFlow reads these once, when first imported, so they are set here, before any module imports it:
quiet logs (TF 2.21 logs harmless tf.data op errors), and oneDNN's kernels, TensorFlow's own default on
x86, named explicitly because that also silences the notice it prints at start: they run a small
network's convolutions in half the time of the Eigen kernels.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
