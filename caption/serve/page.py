"""The page at ``/``: the HTML viewer (:mod:`caption.viz.viewer`, its own CSS and script) with an
upload form. The form's script sends the photo to ``POST /v1/caption`` and hands the answer to
the viewer's ``window.captionViewer.show``; everything is inline, nothing is fetched but the API."""

from __future__ import annotations

import html
from importlib import resources

from caption.viz import viewer


def _asset(name: str) -> str:
    return resources.files("caption.serve").joinpath("assets", name).read_text(encoding="utf-8")


def index_page(model_name: str, about: str, beam: int, max_beam: int, guided: bool) -> str:
    """The page for a model named ``model_name`` (``about``: one line on what it runs with); its
    beam menu offers 1..``max_beam`` with ``beam`` chosen; the guide checkbox shows when ``guided``."""
    beams = "".join(f'<option value="{k}"{" selected" if k == beam else ""}>{k}</option>'
                    for k in range(1, max_beam + 1))
    form = (_asset("upload.html").replace("{{beams}}", beams).replace("{{guide_hidden}}", "" if guided else " hidden")
            .replace("{{model}}", html.escape(about)))
    return viewer.render_page([], title=f"caption \u2014 {model_name}", labels=["model"], gallery=False,
                              head=f"<style>\n{_asset('upload.css')}</style>", before=form,
                              after=f"<script>\n{_asset('upload.js')}</script>")
