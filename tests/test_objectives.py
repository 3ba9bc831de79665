import math

import pytest
import torch
import torch.nn.functional as F

from sspo.objectives import SSR_VARIANTS, dpo_loss, sft_loss, sspo_loss

BETA = 3.0


def _rand(seed, b=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4)]


def _mixed(seed=0, b=16):
    """Random errors where the first half has err_w_ref < err_w (s = -1)."""
    e_w, e_w_ref, e_l, e_l_ref = _rand(seed, b)
    e_w_ref = torch.where(torch.arange(b) < b // 2, e_w - 0.1, e_w + 0.1)
    return e_w, e_w_ref, e_l, e_l_ref


def _nll(x):
    # -log(sigmoid(x)) written independently of F.logsigmoid
    return torch.log1p(torch.exp(-x))


def test_ssr_variants_exported():
    assert SSR_VARIANTS == ("sign", "indicator", "sft", "off")


def test_sft_loss():
    e = torch.tensor([0.1, 0.2, 0.6], dtype=torch.float64)
    loss, stats = sft_loss(e)
    assert torch.isclose(loss, torch.tensor(0.3, dtype=torch.float64))
    assert stats == pytest.approx({"err_w": 0.3})


def test_policy_equals_reference_gives_log2():
    e_w, _, e_l, _ = _rand(1)
    loss, stats = dpo_loss(e_w, e_w.clone(), e_l, e_l.clone(), BETA)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["implicit_acc"] == 0.0  # ties count as incorrect
    for ssr in SSR_VARIANTS:
        loss, stats = sspo_loss(e_w, e_w.clone(), e_l, e_l.clone(), BETA, ssr=ssr)
        assert loss.item() == pytest.approx(math.log(2)), ssr
        assert stats["ssr_rate"] == 0.0


def test_off_equals_dpo():
    e_w, e_w_ref, e_l, e_l_ref = _rand(2)
    a, sa = sspo_loss(e_w, e_w_ref, e_l, e_l_ref, BETA, ssr="off")
    b, sb = dpo_loss(e_w, e_w_ref, e_l, e_l_ref, BETA)
    assert torch.allclose(a, b)
    for k in ("implicit_acc", "logit", "err_w", "err_w_ref"):
        assert sa[k] == pytest.approx(sb[k])
    assert sa["err_l"] == pytest.approx(sb["err_l"])
    assert sa["err_l_ref"] == pytest.approx(sb["err_l_ref"])


def test_dpo_matches_formula():
    e_w, e_w_ref, e_l, e_l_ref = _rand(3)
    loss, stats = dpo_loss(e_w, e_w_ref, e_l, e_l_ref, BETA)
    x = -BETA / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref))
    assert torch.allclose(loss, _nll(x).mean())
    assert stats["implicit_acc"] == pytest.approx((x > 0).double().mean().item())
    assert stats["logit"] == pytest.approx(x.mean().item())
    assert stats["err_l_ref"] == pytest.approx(e_l_ref.mean().item())


@pytest.mark.parametrize("seed", [4, 5])
def test_sspo_variants_match_formula(seed):
    e_w, e_w_ref, e_l, e_l_ref = _mixed(seed)
    dw, dl = e_w - e_w_ref, e_l - e_l_ref
    neg = [bool(e_w_ref[i] < e_w[i]) for i in range(len(e_w))]
    assert any(neg) and not all(neg)
    exp = {"sign": [], "indicator": [], "sft": []}
    for i, n in enumerate(neg):
        s = -1.0 if n else 1.0
        exp["sign"].append(_nll(-BETA / 2 * (dw[i] - s * dl[i])))
        exp["indicator"].append(_nll(-BETA / 2 * (dw[i] - (0.0 if n else 1.0) * dl[i])))
        exp["sft"].append(e_w[i] if n else _nll(-BETA / 2 * (dw[i] - dl[i])))
    for ssr, terms in exp.items():
        loss, stats = sspo_loss(e_w, e_w_ref, e_l, e_l_ref, BETA, ssr=ssr)
        assert torch.allclose(loss, torch.stack(terms).mean()), ssr
        x = -BETA / 2 * (dw - dl)
        assert stats["implicit_acc"] == pytest.approx((x > 0).double().mean().item())
        assert stats["ssr_rate"] == pytest.approx(0.5)
        assert stats["err_l"] == pytest.approx(e_l.mean().item())


def _grads(fn, e_w, e_w_ref, e_l, e_l_ref, **kw):
    e_w = e_w.clone().requires_grad_(True)
    e_l = e_l.clone().requires_grad_(True)
    loss, _ = fn(e_w, e_w_ref, e_l, e_l_ref, BETA, **kw)
    loss.backward()
    return e_w.grad, e_l.grad


def test_gradient_signs():
    e_w, e_w_ref, e_l, e_l_ref = _mixed(6)
    b = len(e_w)
    pos, neg = e_w_ref >= e_w, e_w_ref < e_w

    gw, gl = _grads(dpo_loss, e_w, e_w_ref, e_l, e_l_ref)
    assert (gw > 0).all() and (gl < 0).all()

    gw, gl = _grads(sspo_loss, e_w, e_w_ref, e_l, e_l_ref, ssr="sign")
    assert (gw > 0).all()
    assert (gl[pos] < 0).all()
    assert (gl[neg] > 0).all()  # s = -1: both images pulled toward lower error

    gw, gl = _grads(sspo_loss, e_w, e_w_ref, e_l, e_l_ref, ssr="indicator")
    assert (gw > 0).all() and (gl[pos] < 0).all()
    assert (gl[neg] == 0).all()

    gw, gl = _grads(sspo_loss, e_w, e_w_ref, e_l, e_l_ref, ssr="sft")
    assert torch.allclose(gw[neg], torch.full_like(gw[neg], 1.0 / b))
    assert (gl[neg] == 0).all()
    assert (gw[pos] > 0).all() and (gl[pos] < 0).all()


def test_sign_is_detached():
    e_w, e_w_ref, e_l, e_l_ref = _mixed(7)
    b = len(e_w)
    neg = e_w_ref < e_w
    gw, gl = _grads(sspo_loss, e_w, e_w_ref, e_l, e_l_ref, ssr="sign")
    # d/d e_w of -logsigmoid(-beta/2 (dw + dl)) / B = beta/2 * sigmoid(beta/2 (dw + dl)) / B
    z = BETA / 2 * ((e_w - e_w_ref) + (e_l - e_l_ref))
    expected = BETA / 2 * torch.sigmoid(z) / b
    assert torch.allclose(gw[neg], expected[neg])
    assert torch.allclose(gl[neg], expected[neg])


@pytest.mark.parametrize("k", [0, 3, 8])
def test_ssr_rate_counts_negative_sign(k):
    b = 8
    e_w, _, e_l, e_l_ref = _rand(8, b)
    # first k: ref better (s = -1); next two: ties (s = +1); rest: policy better
    e_w_ref = e_w + 0.2
    e_w_ref[:k] = e_w[:k] - 0.2
    e_w_ref[k : k + 2] = e_w[k : k + 2]
    for ssr in SSR_VARIANTS:
        _, stats = sspo_loss(e_w, e_w_ref, e_l, e_l_ref, BETA, ssr=ssr)
        assert stats["ssr_rate"] == pytest.approx(k / b), ssr


def test_ties_follow_plus_one_branch():
    e_w, _, e_l, e_l_ref = _rand(9, 4)
    a, _ = sspo_loss(e_w, e_w.clone(), e_l, e_l_ref, BETA, ssr="sign")
    b, _ = sspo_loss(e_w, e_w.clone(), e_l, e_l_ref, BETA, ssr="off")
    assert torch.allclose(a, b)


def test_stats_are_python_floats():
    e = [t.clone().requires_grad_(True) for t in _rand(10)]
    for _, stats in (sspo_loss(*e, BETA), dpo_loss(*e, BETA), sft_loss(e[0])):
        assert all(type(v) is float for v in stats.values())


def test_invalid_inputs_raise():
    e = _rand(11, 4)
    with pytest.raises(ValueError, match="sign"):
        sspo_loss(*e, BETA, ssr="bogus")
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError):
            sspo_loss(*e, beta)
        with pytest.raises(ValueError):
            dpo_loss(*e, beta)
    with pytest.raises(ValueError):
        sspo_loss(e[0], e[1][:3], e[2], e[3], BETA)
    with pytest.raises(ValueError):
        dpo_loss(e[0], e[1], e[2][:3], e[3], BETA)
    with pytest.raises(ValueError):
        sspo_loss(*(t.reshape(2, 2) for t in e), BETA)
    with pytest.raises(ValueError):
        sft_loss(e[0].reshape(2, 2))
