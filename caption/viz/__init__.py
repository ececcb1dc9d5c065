"""Drawing attention: PNG overlays over the photo as taken (``overlay``) and the self-contained
HTML viewer and gallery (``viewer``)."""
