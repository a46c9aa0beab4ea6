"""Sparsity, parameters and multiply-accumulates, measured on the weights as they are.

Denominators: `sparsity` = zeros over all kernels (conv of every kind: depthwise, separable,
transposed; dense: the prunable pool); `conv_sparsity` = conv kernels only; `model_sparsity` = all
parameters. FLOPs are multiply-accumulates per example of those layers (as ShrinkBench counts them):
each kernel weight once per output position (per input position for a transposed conv); dense counts
every weight, effective counts non-zero weights only.
"""

from __future__ import annotations

import numpy as np

from pipeline.pruning.graph import analyze, kernels


def _positions(layer, kind) -> int:
    """Spatial positions one kernel weight is applied at (first call of the layer)."""
    node = layer._inbound_nodes[0]
    shape = (node.input_tensors if kind.spatial == "input" else node.output_tensors)[0].shape
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


def _rows(model) -> list[dict]:
    rows = {}
    for layer, kind, var in kernels(model):
        w = var.numpy()
        nonzero, positions = int(np.count_nonzero(w)), _positions(layer, kind)
        row = rows.setdefault(layer.name, {
            "layer": layer.name, "type": type(layer).__name__, "shape": [], "params": 0, "nonzero": 0,
            "sparsity": 0.0, "macs_dense": 0, "macs_effective": 0, "conv": kind.conv})
        row["shape"].append("x".join(str(d) for d in w.shape))
        row["params"] += int(w.size)
        row["nonzero"] += nonzero
        row["macs_dense"] += int(w.size * positions)
        row["macs_effective"] += int(nonzero * positions)
    for row in rows.values():
        row["shape"] = "+".join(row["shape"])
        row["sparsity"] = 1 - row["nonzero"] / row["params"]
    return list(rows.values())


def layer_rows(model) -> list[dict]:
    """One row per layer with kernels: shape(s), params, non-zeros, sparsity, MACs dense and effective,
    whether it is a conv, and `structured`: the channel group its output channels are pruned with, or
    why they are left whole (pipeline.pruning.graph)."""
    try:
        structured = analyze(model).structured()
    except ValueError as e:  # not a functional model: no graph to walk
        structured = {}
        reason = f"whole: {e}"
    else:
        reason = "whole: not analysed"
    return [r | {"structured": structured.get(r["layer"], reason)} for r in _rows(model)]


def flops(model) -> tuple[int, int]:
    rows = _rows(model)
    return sum(r["macs_dense"] for r in rows), sum(r["macs_effective"] for r in rows)


def summary(model) -> dict[str, float]:
    """The eval/ metrics of DESIGN.md that depend only on the weights (no data)."""
    rows = _rows(model)
    all_weights = [v.numpy() for v in model.weights]
    total = sum(w.size for w in all_weights)
    nonzero = sum(int(np.count_nonzero(w)) for w in all_weights)
    pool = sum(r["params"] for r in rows)
    conv = [r for r in rows if r["conv"]]
    conv_params = sum(r["params"] for r in conv)
    macs_dense, macs_effective = flops(model)
    out = {
        "sparsity": 1 - sum(r["nonzero"] for r in rows) / pool,
        "conv_sparsity": 1 - sum(r["nonzero"] for r in conv) / conv_params if conv_params else 0.0,
        "model_sparsity": 1 - nonzero / total,
        "params_total": total,
        "params_nonzero": nonzero,
        "compression": total / max(nonzero, 1),
        "flops_dense": macs_dense,
        "flops_effective": macs_effective,
        "speedup_theoretical": macs_dense / max(macs_effective, 1),
    }
    return out


def layer_sparsity(model) -> dict[str, float]:
    """layer/<name>/sparsity for every layer with kernels."""
    return {f"layer/{r['layer']}/sparsity": r["sparsity"] for r in _rows(model)}
