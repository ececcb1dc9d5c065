"""Evaluation: captioning a split and scoring it (COCO metrics, in-process CIDEr-D, task metrics
such as the shapes world's content and pointing accuracy)."""
