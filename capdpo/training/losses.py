"""The training losses stage 6 offers (`train.loss_type`), registered in `LOSSES`, and the ones capdpo computes.

TRL's DPOTrainer computes its own loss types (every one of trl 1.16's, combinable with weights, as MPO does);
capdpo adds losses TRL lacks. To add one: write its function here (per-pair losses from the policy's and
reference's completion log-probs and the batch's extra columns), register it in `LOSSES` with `trl=False`, and
give `capdpo.training.trainer.CapdpoDPOTrainer` the branch that calls it; test it against a hand computation
(tests/training/test_losses.py).

## Uni-DPO

DPO weighted by pair quality and by how well the policy already separates the pair.

With per-token average log-probs π_c, π_r (policy) and ref_c, ref_r (reference) and quality scores s_c, s_r on
Uni-DPO's own scale (see `map_scores`)::

    m      = (π_c − π_r) − (ref_c − ref_r)
    w_qual = σ(η · (s_c − s_r))
    w_perf = (1 − σ(β · (π_c − π_r) − τ_ref))^γ          # not detached: it is part of the objective
    loss   = −w_qual · w_perf · log σ(β · m)  −  λ · π_c · [s_c ≥ τ_good and ref_c > π_c]

The last term (calibrated NLL) pulls the chosen completion back up where the policy has pushed it below the
reference, for good chosen answers only. The formulas follow Uni-DPO's published trainer.

## mDPO (`mdpo`)

Added to the other listed loss types, from summed log-probs of the chosen answer with the true image (π_c, ref_c)
and with a corrupted one (π_k, ref_k)::

    conditional = −log σ(β · ((π_c − ref_c) − (π_k − ref_k)))
    anchor      = −log σ(β · (π_c − ref_c) − δ)
    loss        = w · (w_cond · conditional + w_anchor · anchor)

(`capdpo.training.conditional` makes the corrupted image and runs its rows.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Loss:
    """A registered loss type."""

    summary: str
    combines: bool = True  # may be listed with other loss types (a weighted sum, as TRL does)
    trl: bool = True  # TRL's DPOTrainer computes it; False: capdpo's trainer does


# trl 1.16's DPOTrainer loss types
_TRL = {
    "sigmoid": "DPO (Rafailov et al.)",
    "hinge": "SLiC hinge loss",
    "ipo": "IPO",
    "exo_pair": "EXO (needs label_smoothing > 0)",
    "nca_pair": "NCA",
    "robust": "robust DPO (label_smoothing: flip probability)",
    "bco_pair": "BCO",
    "sppo_hard": "SPPO (hard labels)",
    "aot": "AOT (paired)",
    "aot_unpaired": "AOT (unpaired)",
    "apo_zero": "APO-zero",
    "apo_down": "APO-down",
    "discopop": "DiscoPOP",
    "sft": "negative log-likelihood of the chosen completion (RPO / MPO's generation term)",
    "sigmoid_norm": "DPO on length-normalised log-probs",
}
LOSSES: dict[str, Loss] = {
    **{name: Loss(summary) for name, summary in _TRL.items()},
    "unidpo": Loss(
        "Uni-DPO: quality- and performance-weighted DPO with a calibrated NLL term", combines=False, trl=False
    ),
    "mdpo": Loss(
        "mDPO's image-conditional term and anchor, added to the other listed loss ([sigmoid, mdpo] is mDPO)",
        trl=False,
    ),
}


@dataclass
class UniDPOParams:
    """Uni-DPO's constants (defaults: its multimodal recipe)."""

    beta: float = 2.0
    eta: float = 0.7
    tau_ref: float = 2.0
    gamma: float = 3.0
    nll_lambda: float = 0.001
    tau_good: float = 2.5


def map_scores(scores: Any, low: float, high: float) -> Any:
    """Map our scores (0 = inaccurate, 1 = accurate) linearly onto Uni-DPO's scale [low, high]."""
    return low + (high - low) * scores


def unidpo_loss(
    policy_chosen: Any,
    policy_rejected: Any,
    ref_chosen: Any,
    ref_rejected: Any,
    score_chosen: Any,
    score_rejected: Any,
    params: UniDPOParams,
) -> tuple[Any, dict[str, Any]]:
    """Per-pair Uni-DPO losses and their parts.

    Args:
        policy_chosen, policy_rejected: policy log-probs averaged per completion token, shape [B].
        ref_chosen, ref_rejected: the reference's, same shape (no gradient needed).
        score_chosen, score_rejected: quality scores already on Uni-DPO's scale.
        params: the constants.

    Returns:
        (losses [B], parts) where parts holds w_qual, w_perf, nll_active (0/1) and the margin m.
    """
    import torch
    import torch.nn.functional as F

    policy_margin = policy_chosen - policy_rejected
    margin = policy_margin - (ref_chosen - ref_rejected)
    w_qual = torch.sigmoid(params.eta * (score_chosen - score_rejected))
    w_perf = (1 - torch.sigmoid(params.beta * policy_margin - params.tau_ref)) ** params.gamma
    losses = -w_qual * w_perf * F.logsigmoid(params.beta * margin)
    nll_active = ((ref_chosen > policy_chosen) & (score_chosen >= params.tau_good)).to(losses.dtype)
    if params.nll_lambda > 0:
        losses = losses - params.nll_lambda * nll_active.detach() * policy_chosen
    return losses, {"w_qual": w_qual, "w_perf": w_perf, "nll_active": nll_active, "margin": margin}


def mdpo_loss(
    policy_chosen: Any, ref_chosen: Any, policy_corrupt: Any, ref_corrupt: Any, params: Any
) -> tuple[Any, dict[str, Any]]:
    """Per-pair mDPO terms (conditional + anchor, weighted) and their parts.

    Args:
        policy_chosen, ref_chosen: summed log-probs of the chosen answer with the true image, shape [B].
        policy_corrupt, ref_corrupt: the same with the corrupted image.
        params: `capdpo.training.conditional.MdpoParams` (beta, conditional_weight, anchor_weight, anchor δ,
            weight).

    Returns:
        (losses [B], parts) where parts holds conditional, anchor and conditional_margin.
    """
    import torch.nn.functional as F

    chosen_reward = policy_chosen - ref_chosen
    margin = chosen_reward - (policy_corrupt - ref_corrupt)
    conditional = -F.logsigmoid(params.beta * margin)
    anchor = -F.logsigmoid(params.beta * chosen_reward - params.anchor)
    losses = params.weight * (params.conditional_weight * conditional + params.anchor_weight * anchor)
    return losses, {"conditional": conditional, "anchor": anchor, "conditional_margin": margin}
