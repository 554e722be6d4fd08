"""Step math: the pure train/eval steps, the train state and the optimiser (no I/O, no mesh)."""
