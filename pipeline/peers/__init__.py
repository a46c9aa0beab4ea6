"""Peer comparisons: TF-MOT (its own process and venv), ours on the same grid, and the comparison.

- `pipeline.peers.tfmot`   run with .venv-peers (tf_keras + tensorflow-model-optimization), writes peer.json
- `pipeline.peers.ours`    run with .venv (Keras 3), our magnitude method on the same grid, writes ours.json
- `pipeline.peers.compare` both JSONs -> benchmarks/peer.md and benchmarks/peer_accuracy.png
- `pipeline.peers.study`   the seed_report vs default sweeps -> benchmarks/study.md

Nothing here is imported by the pipeline itself; `common` imports neither Keras 3 nor tf_keras.
"""
