"""plugins: what a Flax trainer wires together, built from one ml_collections config.

Modules (import the one you need; none imports the others' heavy dependencies):

- ``plugins.optim``      optax optimizers from config (clipping, weight decay, freezing, groups,
                         accumulation, EMA, non-finite skipping).
- ``plugins.schedules``  learning-rate schedules from config.
- ``plugins.masks``      canonical parameter paths, predicates, label trees, partition, summary.
- ``plugins.losses``     losses from config, accuracy helpers.
- ``plugins.data``       the offline ``digits`` tfds dataset and deterministic input pipelines.
- ``plugins.sharding``   pmap and mesh placement, single- and multi-host.
- ``plugins.config_cli`` one-line errors for ``--config=FILE --config.key=value`` command lines.
- ``plugins.unit_axis``  a per-device function on ``(1, ...)`` blocks (``sharding.pmap``'s).
- ``plugins.transpose_folding``  weight gradients in their parameters' layout under jit data
                         parallelism (a jaxpr rewrite of the train step).
"""

__version__ = "0.1.0"
