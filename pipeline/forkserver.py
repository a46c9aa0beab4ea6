"""Imported by the process the sweep's joblib workers are forked from on Linux (multiprocessing's forkserver:
joblib_workers.preload_workers), and by nothing else: what checking a sweep and training a baseline need is
imported here once, and each worker, as it is forked, imports the tracking modules at low priority
(joblib_workers.forked)."""

import os

import tensorflow  # noqa: F401

# pipeline.run's imports, not the module itself: multiprocessing runs the sweep's main module anew in each
# process it starts (as __mp_main__), and warns if that module is imported there already
import pipeline.sweep  # noqa: F401
from pipeline import joblib_workers

os.register_at_fork(after_in_child=joblib_workers.forked)
