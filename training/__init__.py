"""CAE pretraining, evaluation and dense heads: the torch side of the project."""
