"""The solver core: batched differentiable CG, Lanczos log-determinants, probe estimators,
matching pursuit and proximal tools. Knows nothing of the models built on it."""
