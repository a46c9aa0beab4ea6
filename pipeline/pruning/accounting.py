"""Sparsity, parameters and multiply-accumulates, measured on the weights as they are.

Denominators: `sparsity` = zeros over all conv and dense kernels (the prunable pool);
`conv_sparsity` = conv kernels only; `model_sparsity` = all parameters. FLOPs are
multiply-accumulates per example of conv and dense layers (as ShrinkBench counts them): dense counts
every weight, effective counts non-zero weights only.
"""

from __future__ import annotations

import numpy as np

from pipeline.pruning.graph import prunable_layers


def _spatial(layer) -> int:
    shape = layer.output.shape
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


def layer_rows(model) -> list[dict]:
    """One row per conv/dense layer: shape, params, non-zeros, sparsity, MACs dense and effective."""
    rows = []
    for layer in prunable_layers(model):
        w = layer.kernel.numpy()
        nonzero = int(np.count_nonzero(w))
        rows.append({
            "layer": layer.name,
            "type": type(layer).__name__,
            "shape": "x".join(str(d) for d in w.shape),
            "params": int(w.size),
            "nonzero": nonzero,
            "sparsity": 1 - nonzero / w.size,
            "macs_dense": int(w.size * _spatial(layer)),
            "macs_effective": int(nonzero * _spatial(layer)),
        })
    return rows


def flops(model) -> tuple[int, int]:
    rows = layer_rows(model)
    return sum(r["macs_dense"] for r in rows), sum(r["macs_effective"] for r in rows)


def summary(model) -> dict[str, float]:
    """The eval/ metrics of DESIGN.md that depend only on the weights (no data)."""
    rows = layer_rows(model)
    all_weights = [v.numpy() for v in model.weights]
    total = sum(w.size for w in all_weights)
    nonzero = sum(int(np.count_nonzero(w)) for w in all_weights)
    kernels = sum(r["params"] for r in rows)
    conv = [r for r in rows if r["type"] == "Conv2D"]
    conv_params = sum(r["params"] for r in conv)
    macs_dense, macs_effective = flops(model)
    out = {
        "sparsity": 1 - sum(r["nonzero"] for r in rows) / kernels,
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
    """layer/<name>/sparsity for every conv and dense layer."""
    return {f"layer/{r['layer']}/sparsity": r["sparsity"] for r in layer_rows(model)}
