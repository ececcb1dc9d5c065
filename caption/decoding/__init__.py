"""Caption generation through the decoder's ``prepare``/``init_state``/``step`` only."""

from caption.decoding.search import (
    DecodingOptions,
    DecodingResult,
    Samples,
    SamplingOptions,
    beam_search,
    decode,
    greedy_search,
    sample,
)

__all__ = ["DecodingOptions", "DecodingResult", "Samples", "SamplingOptions", "beam_search", "decode",
           "greedy_search", "sample"]
