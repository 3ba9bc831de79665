"""Training objectives for SSPO on per-sample denoising errors.

Every function takes per-sample mean squared denoising errors of shape (B,)
and returns ``(loss, stats)``: ``loss`` is the batch-mean scalar tensor and
``stats`` a dict of detached python floats. Reference errors (``*_ref``) are
expected to be computed under ``torch.no_grad()`` already.
"""

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

SSR_VARIANTS = ("sign", "indicator", "sft", "off")

Stats = Dict[str, float]


def _check_inputs(*errs: torch.Tensor) -> None:
    shape = errs[0].shape
    for e in errs:
        if e.dim() != 1:
            raise ValueError(f"error tensors must be 1-D (B,), got shape {tuple(e.shape)}")
        if e.shape != shape:
            raise ValueError(
                f"error tensors must share one shape, got {tuple(shape)} and {tuple(e.shape)}"
            )


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _pref_term(delta_w: torch.Tensor, delta_l: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``-logsigmoid(logit)`` with ``logit = -beta/2 * (delta_w - delta_l)``."""
    logit = -0.5 * beta * (delta_w - delta_l)
    return -F.logsigmoid(logit), logit


def _mean(x: torch.Tensor) -> float:
    return x.detach().float().mean().item()


def _acc(logit: torch.Tensor) -> float:
    # Strict ">": a tie (logit == 0) counts as incorrect (0), not 0.5.
    return (logit.detach() > 0).float().mean().item()


def sft_loss(err_w: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """Supervised fine-tuning: mean denoising error on the winners."""
    _check_inputs(err_w)
    loss = err_w.mean()
    return loss, {"err_w": _mean(err_w)}


def dpo_loss(
    err_w: torch.Tensor,
    err_w_ref: torch.Tensor,
    err_l: torch.Tensor,
    err_l_ref: torch.Tensor,
    beta: float,
) -> Tuple[torch.Tensor, Stats]:
    """Diffusion-DPO: ``-logsigmoid(-beta/2 * ((e_w - e_w_ref) - (e_l - e_l_ref)))``.

    ``implicit_acc`` is the fraction of samples with logit > 0 (ties count 0).
    """
    _check_inputs(err_w, err_w_ref, err_l, err_l_ref)
    _check_beta(beta)
    per_sample, logit = _pref_term(err_w - err_w_ref, err_l - err_l_ref, beta)
    stats = {
        "implicit_acc": _acc(logit),
        "logit": _mean(logit),
        "err_w": _mean(err_w),
        "err_w_ref": _mean(err_w_ref),
        "err_l": _mean(err_l),
        "err_l_ref": _mean(err_l_ref),
    }
    return per_sample.mean(), stats


def sspo_loss(
    err_w: torch.Tensor,
    err_w_ref: torch.Tensor,
    err_l: torch.Tensor,
    err_l_ref: torch.Tensor,
    beta: float,
    ssr: str = "sign",
) -> Tuple[torch.Tensor, Stats]:
    """SSPO: DPO whose losing image ``l`` is the reference's self-sample, its role set by the SSR sign.

    ``s = sign(err_w_ref - err_w)`` (detached, ``sign(0) = +1``); per sample
    ``-logsigmoid(-beta/2 * (dw - s * dl))`` with ``dw = err_w - err_w_ref``,
    ``dl = err_l - err_l_ref``. ``ssr`` picks how ``s = -1`` is handled:
    "sign" keeps ``s = -1``; "indicator" uses ``s = 0``; "sft" uses plain
    ``err_w`` for those samples; "off" forces ``s = +1`` (plain DPO).

    Stats: ``ssr_rate`` is the fraction with raw ``s = -1`` (for every variant);
    ``implicit_acc`` is the fraction with ``-beta/2 * (dw - dl) > 0`` (ties
    count 0); ``logit`` is the mean of the logit used in the loss (for "sft",
    the DPO logit ``-beta/2 * (dw - dl)``).
    """
    if ssr not in SSR_VARIANTS:
        raise ValueError(f"ssr must be one of {SSR_VARIANTS}, got {ssr!r}")
    _check_inputs(err_w, err_w_ref, err_l, err_l_ref)
    _check_beta(beta)

    delta_w = err_w - err_w_ref
    delta_l = err_l - err_l_ref
    with torch.no_grad():
        neg = err_w_ref.detach() < err_w.detach()  # raw s == -1; ties give +1
        sign = torch.where(neg, -1.0, 1.0).to(delta_l.dtype)

    dpo_term, dpo_logit = _pref_term(delta_w, delta_l, beta)
    if ssr == "off":
        per_sample, logit = dpo_term, dpo_logit
    elif ssr == "sft":
        per_sample, logit = torch.where(neg, err_w, dpo_term), dpo_logit
    else:
        s = sign if ssr == "sign" else (~neg).to(delta_l.dtype)
        per_sample, logit = _pref_term(delta_w, s * delta_l, beta)

    stats = {
        "ssr_rate": neg.float().mean().item(),
        "implicit_acc": _acc(dpo_logit),
        "logit": _mean(logit),
        "err_w": _mean(err_w),
        "err_w_ref": _mean(err_w_ref),
        "err_l": _mean(err_l),
        "err_l_ref": _mean(err_l_ref),
    }
    return per_sample.mean(), stats


class PairErrors(NamedTuple):
    """Per-sample denoising errors of the winner ``w`` and the losing image ``l``, by the policy and the reference
    (``*_ref``); an objective without a reference or a losing image leaves those None."""

    w: torch.Tensor
    w_ref: Optional[torch.Tensor] = None
    l: Optional[torch.Tensor] = None
    l_ref: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Objective:
    """What one objective trains on: which replay pool entry is the reference ("initial" = θ₀, "latest", "replay" =
    drawn by the run's replay distribution, None = no reference), what the losing image is ("loser" = the paired
    data's, "self_sample" = generated by the reference, None = no losing image) and the loss on their errors."""

    reference: Optional[str]
    losing_image: Optional[str]
    loss: Callable[[PairErrors, float, str], Tuple[torch.Tensor, Stats]]


def _dpo(errors: PairErrors, beta: float, ssr: str) -> Tuple[torch.Tensor, Stats]:
    return dpo_loss(errors.w, errors.w_ref, errors.l, errors.l_ref, beta)


def _sspo(errors: PairErrors, beta: float, ssr: str) -> Tuple[torch.Tensor, Stats]:
    return sspo_loss(errors.w, errors.w_ref, errors.l, errors.l_ref, beta, ssr=ssr)


def _sft(errors: PairErrors, beta: float, ssr: str) -> Tuple[torch.Tensor, Stats]:
    return sft_loss(errors.w)


# Adding an objective is one entry here (and its loss above); the trainer reads nothing else.
OBJECTIVES = {
    "sspo": Objective(reference="replay", losing_image="self_sample", loss=_sspo),
    "dpo": Objective(reference="initial", losing_image="loser", loss=_dpo),
    "spin": Objective(reference="latest", losing_image="self_sample", loss=_dpo),
    "sft": Objective(reference=None, losing_image=None, loss=_sft),
}
