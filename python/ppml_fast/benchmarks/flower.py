"""Flower's FedAvg aggregation, the numpy baseline of ``weighted_aggregate``.

The algorithm of ``flwr.server.strategy.aggregate.aggregate`` (Flower 1.x), restated line for
line so the benchmark needs no Flower install: weighted copies of every layer, reduced with
``np.add``, divided by the total number of examples.
"""

from __future__ import annotations

from functools import reduce

import numpy as np

NDArrays = list[np.ndarray]


def aggregate(results: list[tuple[NDArrays, int]]) -> NDArrays:
    """Compute weighted average (``results``: per client, its layers and its number of examples)."""
    # Calculate the total number of examples used during training
    num_examples_total = sum(num_examples for (_, num_examples) in results)

    # Create a list of weights, each multiplied by the related number of examples
    weighted_weights = [
        [layer * num_examples for layer in weights] for weights, num_examples in results
    ]

    # Compute average weights of each layer
    weights_prime: NDArrays = [
        reduce(np.add, layer_updates) / num_examples_total
        for layer_updates in zip(*weighted_weights)
    ]
    return weights_prime
