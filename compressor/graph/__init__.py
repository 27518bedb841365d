"""The graph layer: everything that reads or rewrites a Keras graph model.

- `keras_api`: the only module that touches Keras' private API.
- `walk`: a model's nodes in topological order, and running them again op by op.
- `clone`: copies of a model through `keras.models.clone_model`'s hooks.
- `outputs`: whether a classifier ends in logits or probabilities.
- `calls`, `flops`, `cost`: every layer call with its shapes, and its params and FLOPs.
- `groups`, `channel_rules`: the channels that must be removed together.

Nothing here imports a technique or a search (tests/test_architecture.py).
"""
