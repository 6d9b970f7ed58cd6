"""Face-verification metrics over embeddings and pair lists (numpy, scikit-learn; no torch)."""
