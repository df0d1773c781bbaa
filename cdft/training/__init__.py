"""Building blocks of the one trainer (:mod:`cdft.train`): sharding, optimizers,
checkpoints, metrics and signal handling."""
