"""Guidance: evidence about what a photo shows (the encoder's ImageNet classifier and its names
table, the people probe, a COCO detector) and the policy and searches that make a caption say it.

It sits above :mod:`caption.decoding`, whose searches it runs through the decoder's ``step``:
:mod:`caption.guidance.guide` turns the evidence into a :class:`~caption.guidance.guide.Plan`
per image, and :func:`caption.guidance.search.guided_decode` is the guided search's entry.
"""
