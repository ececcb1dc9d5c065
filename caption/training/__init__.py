"""Training: the one epoch loop (``loop.fit``) and the objectives it calls (cross-entropy, SCST),
the feature cache, batches, learning-rate schedule, run directory and data-parallel plumbing."""
