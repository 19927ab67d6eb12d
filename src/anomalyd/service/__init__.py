"""The daemon: one tick (worker), scheduler and HTTP endpoints, state, sharding, model files, training."""
