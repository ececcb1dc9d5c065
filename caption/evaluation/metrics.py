"""COCO caption metrics over plain strings: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D).

Scores come from pycocoevalcap, so they match the numbers papers report: each image is scored
once against all of its references, BLEU/METEOR/ROUGE-L on a 0-1 scale, CIDEr on its usual
0-10 scale (pycocoevalcap's ``Cider`` is the CIDEr-D variant: clipped n-gram counts, a length
penalty, times 10). Its document frequencies come from the references passed in, so CIDEr on a
subset of a split is not CIDEr on the whole split.

With Java on the PATH, captions are tokenised by the Stanford PTB tokenizer and METEOR is
computed, exactly as in the COCO evaluation server. Without Java, ``caption.vocab.tokenize``
replaces the PTB tokenizer and METEOR is skipped, with one warning. SPICE is deliberately left
out: it downloads Stanford CoreNLP models on first use and needs several GB of memory.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from caption.errors import CaptionError
from caption.fileio import atomic_write_json
from caption.vocab import tokenize


class MetricsError(CaptionError, RuntimeError):
    """Java (PTB tokenizer, METEOR) missing or failing; the message says how to score without it."""


METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# pycocoevalcap's input shape: image id -> list of space-joined, tokenised captions.
Tokenised = dict[Hashable, list[str]]


def coco_scores(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    java: bool | None = None,
) -> dict[str, float]:
    """Corpus-level COCO metrics of one candidate caption per image against its references.

    ``java=None`` uses Java when a ``java`` executable is on the PATH; ``java=False`` forces
    the pure-Python fallback (no METEOR key in the result, one UserWarning).
    """
    _check_inputs(candidates, references)
    use_java = _java_available() if java is None else java
    if use_java and not _java_available():
        raise MetricsError("java=True, but no `java` executable is on the PATH")
    if use_java:
        res, gts = _ptb_tokenize(candidates, references)
    else:
        warnings.warn(
            "Java was not found (or java=False): METEOR is skipped and the PTB tokenizer is "
            "replaced by caption.vocab.tokenize, so scores may differ slightly from the "
            "official COCO evaluation",
            UserWarning,
            stacklevel=2,
        )
        res = {i: [" ".join(tokenize(c))] for i, c in candidates.items()}
        gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in references.items()}
    scores = _python_scores(gts, res)
    if use_java:
        scores["METEOR"] = _meteor(gts, res)
    return {key: scores[key] for key in METRIC_KEYS if key in scores}


def write_results(captions: Mapping[int, str], path: str | os.PathLike) -> Path:
    """Write COCO results JSON ``[{"image_id": int, "caption": str}, ...]`` atomically."""
    rows = [{"image_id": int(i), "caption": str(c)} for i, c in captions.items()]
    return atomic_write_json(path, rows, ensure_ascii=False)


def _java_available() -> bool:
    return shutil.which("java") is not None


def _check_inputs(candidates: Mapping, references: Mapping) -> None:
    """Same image ids on both sides, at least one image, at least one reference each."""
    if not candidates and not references:
        raise ValueError("no captions to score: candidates and references are both empty")
    missing_refs = [i for i in candidates if i not in references]
    if missing_refs:
        raise ValueError(f"image id {missing_refs[0]!r} has a candidate but no references "
                         f"({len(missing_refs)} such ids)")
    missing_cands = [i for i in references if i not in candidates]
    if missing_cands:
        raise ValueError(f"image id {missing_cands[0]!r} has references but no candidate "
                         f"({len(missing_cands)} such ids)")
    for i, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references of image id {i!r} must be a non-empty list of strings")


def _ptb_tokenize(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[Tokenised, Tokenised]:
    """Candidates and references through the Java PTB tokenizer, in one JVM start."""
    batch = {("cand", i): [{"caption": c}] for i, c in candidates.items()}
    batch.update({("ref", i): [{"caption": r} for r in refs] for i, refs in references.items()})
    try:
        out = PTBTokenizer().tokenize(batch)
    except OSError as err:  # e.g. its temp file goes next to the jar, in site-packages
        raise MetricsError(f"the Java PTB tokenizer failed to run: {err}; "
                           "pass java=False (caption evaluate --no-java) to use the pure-Python tokenizer") from err
    # pycocoevalcap ignores the tokenizer's exit status: a dead JVM shows up as missing lines.
    if any(len(out.get(key, ())) != len(caps) for key, caps in batch.items()):
        raise MetricsError("the Java PTB tokenizer returned fewer lines than captions given; "
                           "pass java=False (caption evaluate --no-java) to use the pure-Python tokenizer")
    res = {i: out[("cand", i)] for i in candidates}
    gts = {i: out[("ref", i)] for i in candidates}
    return res, gts


def _python_scores(gts: Tokenised, res: Tokenised) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr, with pycocoevalcap's prints kept off stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["ROUGE-L"] = float(rouge)
    scores["CIDEr"] = float(cider)
    return scores


def _meteor(gts: Tokenised, res: Tokenised) -> float:
    """METEOR via pycocoevalcap's Java subprocess, which is always shut down afterwards."""
    try:
        meteor = Meteor()
    except OSError as err:
        raise MetricsError(f"could not start METEOR's Java process: {err}") from err
    try:
        score, _ = meteor.compute_score(gts, res)
    except (OSError, ValueError) as err:  # broken pipe, or an empty line from a dead JVM
        raise MetricsError(f"METEOR's Java process failed ({err!r}); "
                           f"its stderr: {_stderr_tail(meteor)!r}") from err
    finally:
        _close_meteor(meteor)
    return float(score)


def _stderr_tail(meteor: Meteor, limit: int = 500) -> str:
    """Last ``limit`` characters the METEOR JVM wrote to stderr (kills it first, so no hang)."""
    meteor.meteor_p.kill()
    return meteor.meteor_p.stderr.read()[-limit:].decode(errors="replace").strip()


def _close_meteor(meteor: Meteor) -> None:
    """Stop the JVM and free its pipes; safe to call twice.

    ``Meteor.compute_score`` keeps its lock when it raises, and ``Meteor.__del__`` acquires
    that lock, so without the release the interpreter would hang at garbage collection.
    """
    if meteor.lock.locked():
        meteor.lock.release()
    proc = meteor.meteor_p
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
