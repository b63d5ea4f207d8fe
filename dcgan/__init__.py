"""The model and its life (layer: dcgan): networks, training on Ray Train, checkpoints, sampling, evaluation and the
`dcgan` CLI. May import `preprocessing` (shard reading, storage, where work runs); never `pipelines`."""
