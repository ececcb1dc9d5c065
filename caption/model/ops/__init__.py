"""Fast kernels of the model, each beside the plain formula it computes: CPU fp32 linear maps through
oneDNN (``linear``), the recurrent weight's gradient formed once per sequence (``deferred``) and the
chunked v^T tanh(k + q) scores of the additive and concat scorers (``tanh_scores``)."""
