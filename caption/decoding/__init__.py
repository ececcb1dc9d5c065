"""Caption generation through the decoder's ``prepare``/``init_state``/``step`` only.

``DecodeConfig`` (the ``decode`` section of a config, :class:`caption.config.DecodeConfig`) is
the one options type; :func:`decode` picks the strategy from it: greedy search and sampling share
one loop (:mod:`caption.decoding.search`), beam search is batched (:mod:`caption.decoding.beam`)
on the beam core (:mod:`caption.decoding.core`) that constrained search shares; every search bans
words through :func:`caption.decoding.rules.ban`.
"""

from caption.config import DecodeConfig
from caption.decoding.beam import beam_search
from caption.decoding.results import DecodingResult, Samples
from caption.decoding.search import decode, greedy_search, sample

__all__ = ["DecodeConfig", "DecodingResult", "Samples", "beam_search", "decode", "greedy_search", "sample"]
