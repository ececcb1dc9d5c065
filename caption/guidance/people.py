"""Whether a photo shows people: a linear probe on the encoder's grid features.

The ImageNet classifier has no person class, and the captioner, trained on photos that nearly all
show people, puts a person into most photos of lone objects. The probe answers the one question
guidance needs (:mod:`caption.guidance.guide`): is this a photo of people (its plain caption
stays, so a thing's name never takes a person's place) or of an object (the object is the subject,
no one is invented)?

It is logistic regression on the features' spatial mean and max (B, 2D), fitted by
``scripts/fit_people_probe.py`` on the Flickr8k training photos, each labelled by its human
captions (a photo shows people when most of its captions name one). One probe per encoder, packaged
as ``caption/assets/people_<encoder>.pt`` (weights only, standardisation folded in).
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

from caption.config import ModelConfig


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, 2D): the spatial mean and max of features (B, L, D), what the probe reads."""
    features = features.float()
    return torch.cat([features.mean(1), features.amax(1)], dim=1)  # (B, 2D)


class PeopleProbe(nn.Module):
    """features (B, L, D) -> (B,) probability that the photo shows people."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(pooled(features)).squeeze(1))  # (B,)


def fit_probe(features: torch.Tensor, people: torch.Tensor, weight_decay: float = 1e-2,
              max_iter: int = 500) -> PeopleProbe:
    """A probe fitted to pooled features (N, 2D) (:func:`pooled`) and labels ``people`` (N,) bool:
    L2-regularised logistic regression on standardised inputs (L-BFGS), the standardisation then
    folded into the weights."""
    x = features.float()
    mean, std = x.mean(0), x.std(0) + 1e-4  # (2D,) each
    z = (x - mean) / std  # (N, 2D)
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = people.float()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = PeopleProbe(x.shape[1] // 2)
    with torch.no_grad():
        probe.linear.weight.copy_((w / std).unsqueeze(0))  # (1, 2D)
        probe.linear.bias.copy_(b - (w * mean / std).sum())
    return probe.eval().requires_grad_(False)


def probe_file(encoder: str) -> str:
    return f"people_{encoder}.pt"


def load_probe(cfg: ModelConfig) -> PeopleProbe | None:
    """The packaged probe of the run's encoder, or None where there is none (another encoder, or
    features the probe was not fitted on: another stage, coordinates, fine-tuned or random weights)."""
    if cfg.stage != 32 or cfg.coord_features or cfg.fine_tune or cfg.weights.lower() == "none":
        return None
    path = resources.files("caption").joinpath("assets", probe_file(cfg.encoder))
    if not path.is_file():
        return None
    with path.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    probe = PeopleProbe(state["linear.weight"].shape[1] // 2)
    probe.load_state_dict(state)
    return probe.eval().requires_grad_(False)
