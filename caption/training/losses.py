"""Training loss: masked cross-entropy plus the doubly-stochastic attention penalty."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from caption.model.decoder import DecoderOutput


class Loss(NamedTuple):
    total: torch.Tensor  # what is back-propagated
    xent: torch.Tensor  # mean cross-entropy per real (non-padding) token
    penalty: torch.Tensor  # λ Σ_i (1 - Σ_t α_ti)^2, averaged over the batch
    ground: torch.Tensor | float = 0.0  # weighted −log(attention mass in the word's box), per grounded word

    def grounded(self, term: torch.Tensor) -> "Loss":
        """This loss with the box-supervision term (:mod:`caption.training.grounding`) added."""
        return self._replace(total=self.total + term, ground=term)


def caption_loss(
    out: DecoderOutput, alpha_c: float = 1.0, *,
    token_count: torch.Tensor | float | None = None, image_count: torch.Tensor | float | None = None,
) -> Loss:
    """Cross-entropy over real tokens + λ Σ_i (1 − Σ_t α_ti)², as in Xu et al. 2015.

    Padded steps count in neither term. The penalty sums over grid cells and then averages
    over the batch (averaging over cells too would make it ~L times weaker). By default both
    terms are means over this batch; ``token_count``/``image_count`` replace the divisors (data
    parallel training divides by the global batch so that gradients match one process).
    """
    mask = out.mask  # (B, T)
    xent_sum = F.cross_entropy(out.word_logits.float(), out.targets[mask], reduction="sum")  # real words only
    coverage = (out.alphas.float() * mask.unsqueeze(-1)).sum(dim=1)  # (B, L)
    penalty_sum = alpha_c * ((1.0 - coverage) ** 2).sum()
    xent = xent_sum / (mask.sum() if token_count is None else token_count)
    penalty = penalty_sum / (mask.shape[0] if image_count is None else image_count)
    return Loss(xent + penalty, xent, penalty)
