"""Data: caption records (COCO, Karpathy), images (loading, preprocessing, background decoding),
the datasets built on them, and the synthetic shapes world. Knows nothing of the model."""
