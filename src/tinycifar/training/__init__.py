"""Training: the recipe's loop (train), the learning-rate range test, sweeps, TensorBoard logging and losses."""
