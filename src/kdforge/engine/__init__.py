"""Training engine: the Fabric loop, checkpoints, pipelines."""
