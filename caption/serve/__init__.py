"""``caption serve``: captions over HTTP for programs, and a page where a person drops a photo and
sees where each word looked. FastAPI on uvicorn (the ``serve`` extra); dynamic batching of
concurrent requests (:mod:`caption.serve.batcher`); the API in :mod:`caption.serve.app`; the page
reuses the HTML viewer (:mod:`caption.serve.page`); :func:`caption.serve.server.serve` runs it."""
