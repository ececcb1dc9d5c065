"""Fast kernels of the model, each beside the plain formula it computes: CPU fp32 linear maps
through oneDNN (``linear``) and a recurrent weight gradient formed once per sequence (``deferred``)."""
