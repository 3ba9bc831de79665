"""Training objectives for SSPO on per-sample denoising errors.

Every function takes per-sample mean squared denoising errors of shape (B,)
and returns ``(loss, stats)``: ``loss`` is the batch-mean scalar tensor and
``stats`` a dict of detached python floats. Reference errors (``*_ref``) are
expected to be computed under ``torch.no_grad()`` already.
"""

from typing import Dict, Tuple

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
    err_r: torch.Tensor,
    err_r_ref: torch.Tensor,
    beta: float,
    ssr: str = "sign",
) -> Tuple[torch.Tensor, Stats]:
    """SSPO: DPO with a self-sample ``r`` whose role is set by the self-sample ratio sign.

    ``s = sign(err_w_ref - err_w)`` (detached, ``sign(0) = +1``); per sample
    ``-logsigmoid(-beta/2 * (dw - s * dr))`` with ``dw = err_w - err_w_ref``,
    ``dr = err_r - err_r_ref``. ``ssr`` picks how ``s = -1`` is handled:
    "sign" keeps ``s = -1``; "indicator" uses ``s = 0``; "sft" uses plain
    ``err_w`` for those samples; "off" forces ``s = +1`` (plain DPO).

    Stats: ``ssr_rate`` is the fraction with raw ``s = -1`` (for every variant);
    ``implicit_acc`` is the fraction with ``-beta/2 * (dw - dr) > 0`` (ties
    count 0); ``logit`` is the mean of the logit used in the loss (for "sft",
    the DPO logit ``-beta/2 * (dw - dr)``).
    """
    if ssr not in SSR_VARIANTS:
        raise ValueError(f"ssr must be one of {SSR_VARIANTS}, got {ssr!r}")
    _check_inputs(err_w, err_w_ref, err_r, err_r_ref)
    _check_beta(beta)

    delta_w = err_w - err_w_ref
    delta_r = err_r - err_r_ref
    with torch.no_grad():
        neg = err_w_ref.detach() < err_w.detach()  # raw s == -1; ties give +1
        sign = torch.where(neg, -1.0, 1.0).to(delta_r.dtype)

    dpo_term, dpo_logit = _pref_term(delta_w, delta_r, beta)
    if ssr == "off":
        per_sample, logit = dpo_term, dpo_logit
    elif ssr == "sft":
        per_sample, logit = torch.where(neg, err_w, dpo_term), dpo_logit
    else:
        s = sign if ssr == "sign" else (~neg).to(delta_r.dtype)
        per_sample, logit = _pref_term(delta_w, s * delta_r, beta)

    stats = {
        "ssr_rate": neg.float().mean().item(),
        "implicit_acc": _acc(dpo_logit),
        "logit": _mean(logit),
        "err_w": _mean(err_w),
        "err_w_ref": _mean(err_w_ref),
        "err_r": _mean(err_r),
        "err_r_ref": _mean(err_r_ref),
    }
    return per_sample.mean(), stats
