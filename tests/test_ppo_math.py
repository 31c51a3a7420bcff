import math

import numpy as np
import pytest
import torch

from ppo import (AdaptiveKLController, FixedKLController, PPOError, compute_gae, compute_rewards, entropy_from_logits,
                 explained_variance, group_advantages, kl_penalty, logprobs_from_logits, masked_mean, masked_var,
                 masked_whiten, policy_loss, shuffled_scores, value_loss)


def ragged_mask(B, T, gen, prompt_left=False):
    """Rows with a random number (>= 1) of valid tokens; optionally preceded by masked prompt positions."""
    mask = torch.zeros(B, T)
    for b in range(B):
        start = int(torch.randint(0, T // 3, (1,), generator=gen)) if prompt_left else 0
        length = int(torch.randint(1, T - start + 1, (1,), generator=gen))
        mask[b, start:start + length] = 1
    return mask


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain per-sequence GAE over the valid positions, in Python floats."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t] == 1]
        a = 0.0
        for i in reversed(range(len(idx))):
            t = idx[i]
            next_v = float(values[b, idx[i + 1]]) if i + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            a = delta + gamma * lam * a
            adv[b, t] = a
    return adv


@pytest.mark.parametrize("gamma,lam,prompt_left", [(1.0, 0.95, False), (0.9, 0.8, False), (1.0, 1.0, True),
                                                   (0.99, 0.95, True)])
def test_gae_matches_plain_loop(gamma, lam, prompt_left):
    gen = torch.Generator().manual_seed(1)
    B, T = 7, 13
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_mask(B, T, gen, prompt_left).double()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref = gae_loop(rewards.numpy(), values.numpy(), mask.numpy(), gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), (ref + values.numpy()) * mask.numpy(), rtol=1e-12, atol=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_case():
    # gamma = lam = 1: advantages are Monte Carlo return minus value, returns the plain return-to-go
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 5.0 and 9.0 are padding and must not leak in
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.75, 0.5, 0.0]]
    assert ret.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    # lam = 0: one-step TD errors, delta_t = r_t + gamma V_{t+1} - V_t, next value after the end is 0
    adv, _ = compute_gae(rewards, values, mask, 0.5, 0.0)
    assert torch.allclose(adv, torch.tensor([[0 + 0.5 * 0.25 - 0.5, 0 + 0.5 * 0.5 - 0.25, 1 - 0.5, 0]]))


def test_gae_rejects_holes():
    with pytest.raises(PPOError):
        compute_gae(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.1])
    d = (logp - ref).tolist()
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.5 * x * x for x in d])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-x) - 1 + x for x in d])
    with pytest.raises(PPOError):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_unbiased_and_k3_nonnegative():
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, generator=gen), 0)
    q = torch.softmax(torch.randn(6, generator=gen), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    x = torch.multinomial(p, 400_000, replacement=True, generator=gen)  # tokens sampled from the policy
    logp, ref = p.log()[x].double(), q.log()[x].double()
    assert float(kl_penalty(logp, ref, "k1").mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(kl_penalty(logp, ref, "k3").mean()) == pytest.approx(true_kl, abs=0.01)
    wide = torch.randn(10_000, generator=gen) * 10
    assert (kl_penalty(wide, torch.zeros_like(wide), "k3") >= 0).all()


def test_masked_stats_and_whiten_match_numpy():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3 + 2
    mask = ragged_mask(5, 9, gen, prompt_left=True).double()
    x_pad = x.clone()
    x_pad[mask == 0] = float("nan")  # padding garbage must not reach the statistics
    v = x.numpy()[mask.numpy() == 1]
    assert float(masked_mean(x_pad, mask)) == pytest.approx(v.mean(), rel=1e-12)
    assert float(masked_var(x_pad, mask)) == pytest.approx(v.var(ddof=1), rel=1e-12)
    assert float(masked_var(x_pad, mask, unbiased=False)) == pytest.approx(v.var(), rel=1e-12)
    w = masked_whiten(x_pad, mask)
    np.testing.assert_allclose(w.numpy()[mask.numpy() == 1], (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8),
                               rtol=1e-10)
    assert (w[mask == 0] == 0).all()
    w = masked_whiten(x_pad, mask, shift_mean=False)
    np.testing.assert_allclose(w.numpy()[mask.numpy() == 1],
                               (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8) + v.mean(), rtol=1e-10)


def test_whiten_constant_input_is_finite():
    x = torch.full((2, 3), 0.7)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = masked_whiten(x, mask)
    assert torch.isfinite(w).all() and w.abs().max() < 1e-3
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), 0.7 * mask, atol=1e-3)
    assert float(masked_var(torch.tensor([4.0]), torch.tensor([1.0]))) == 0.0


@pytest.mark.parametrize("temperature,dtype", [(1.0, torch.float32), (0.7, torch.float32), (1.3, torch.bfloat16)])
def test_logprobs_and_entropy_match_naive(temperature, dtype):
    gen = torch.Generator().manual_seed(4)
    B, T, V = 3, 5, 50
    logits = (torch.randn(B, T, V, generator=gen) * 4).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    naive = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = logprobs_from_logits(logits, tokens, temperature)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert torch.allclose(got.double(), naive, atol=1e-5)
    naive_h = -(logp_all.exp() * logp_all).sum(-1)
    got_h = entropy_from_logits(logits, temperature)
    assert torch.allclose(got_h.double(), naive_h, atol=1e-5)


def test_entropy_uniform_and_one_hot():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4  # effectively one-hot
    h = entropy_from_logits(logits)
    assert float(h[0, 0]) == pytest.approx(math.log(8), rel=1e-6)
    assert float(h[0, 1]) == pytest.approx(0.0, abs=1e-6)


def test_logprobs_gradient_matches_naive():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 11, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 4), generator=gen)
    logprobs_from_logits(logits, tokens, 0.8).sum().backward()
    g1 = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits / 0.8, -1).gather(-1, tokens.unsqueeze(-1)).sum().backward()
    assert torch.allclose(g1, logits.grad, atol=1e-6)


def test_compute_rewards_hand():
    score = torch.tensor([[0.0, 0.1, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = compute_rewards(score, logp, ref, mask, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.2, 1.0, 0.0])
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0])


def test_shuffled_scores_match_plain_loop():
    gen = torch.Generator().manual_seed(11)
    B, T = 9, 12
    mask = ragged_mask(B, T, gen, prompt_left=True)
    scores = torch.randn(B, T, generator=gen) * mask  # CCRL-like: terms inside the response, several per row
    out = shuffled_scores(scores, mask, torch.Generator().manual_seed(3))
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(3)).tolist()  # the permutation it drew
    expect = torch.zeros(B, T)
    for b in range(B):
        dst = perm[b]
        last = max(t for t in range(T) if mask[dst, t] == 1)
        expect[dst, last] = sum(float(x) for x in scores[b])
    assert torch.allclose(out, expect, atol=1e-6)
    assert perm != list(range(B))  # the draw moved rows (else the control would be the real run)
    assert sorted(out.sum(1).tolist()) == pytest.approx(sorted(scores.sum(1).tolist()), abs=1e-6)  # same rewards


def test_group_advantages_match_loop():
    gen = torch.Generator().manual_seed(6)
    G, n = 4, 5
    scores = torch.randint(0, 3, (G * n,), generator=gen).float()
    scores[:G] = 1.0  # an all-equal group: GRPO gives 0, not a division by zero
    grpo, rloo = group_advantages(scores, G, "grpo"), group_advantages(scores, G, "rloo")
    for g in range(n):
        r = scores[g * G:(g + 1) * G].tolist()
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        for i in range(G):
            assert float(grpo[g * G + i]) == pytest.approx((r[i] - mean) / (std + 1e-4), abs=1e-5)
            others = [r[j] for j in range(G) if j != i]
            assert float(rloo[g * G + i]) == pytest.approx(r[i] - sum(others) / (G - 1), abs=1e-6)
    assert (grpo[:G] == 0).all()
    with pytest.raises(PPOError):
        group_advantages(scores, 1)
    with pytest.raises(PPOError):
        group_advantages(scores[:7], G)
    with pytest.raises(PPOError):
        group_advantages(scores, G, "ppo")


def test_policy_loss_hand_case():
    # ratio 1.5 / 0.5 against positive and negative advantages, clip 0.2; the last token is padding
    ratio = [1.5, 0.5, 0.5, 1.5, 1.1, 1.0]
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 1.0, 100.0]])
    logp_old = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -0.2, -1.0]])
    logp_new = logp_old + torch.log(torch.tensor([ratio]))
    logp_new[0, 5] = 50.0  # a stale padding entry: must neither overflow nor count
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp_new, logp_old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)):
    # A=2,  r=1.5: max(-3.0, -2.4) = -2.4  (clip active: no more credit past 1.2)
    # A=2,  r=0.5: max(-1.0, -1.6) = -1.0
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clip active: no more credit below 0.8)
    # A=-1, r=1.5: max( 1.5,  1.2) =  1.5
    # A=1,  r=1.1: max(-1.1, -1.1) = -1.1  (inside the range: the two terms tie, not clipped)
    assert float(loss) == pytest.approx((-2.4 - 1.0 + 0.8 + 1.5 - 1.1) / 5, rel=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 5)
    k3 = [(r - 1) - math.log(r) for r in ratio[:5]]
    assert float(stats["approx_kl"]) == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert float(stats["ratio"]) == pytest.approx(np.mean(ratio[:5]), rel=1e-6)
    assert float(stats["ratio_var"]) == pytest.approx(np.var(ratio[:5], ddof=1), rel=1e-6)
    assert torch.isfinite(loss)


def test_policy_loss_gradient_zero_where_clipped():
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    logp_old = torch.zeros(1, 4)
    logp_new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_()
    loss, _ = policy_loss(logp_new, logp_old, adv, torch.ones(1, 4), clip=0.2)
    loss.backward()
    # d/dlogp of -A r / n is -A r / n on unclipped tokens, 0 on clipped ones
    assert logp_new.grad[0].tolist() == pytest.approx([0.0, -2 * 0.5 / 4, 0.0, 1.5 / 4])


def test_value_loss_hand_case():
    v_old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    v_new = torch.tensor([[1.5, 1.1, 0.5, 7.0]])
    ret = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(v_new, v_old, ret, mask, clip=0.2)
    # token 0: V clipped to 1.2: max(0.25, 0.64) = 0.64 (clipped term larger)
    # token 1: within the clip: max(1.21, 1.21) = 1.21
    # token 2: V clipped to 0.8: max(0.25, 0.64) = 0.64 (clipped term larger)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21 + 0.64) / 3, rel=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    # Clipping active but the unclipped error the larger: V 1.5 from V_old 1 and R 0 is 2.25, clipped (1.2) 1.44;
    # the max keeps 2.25 (a loss on the clipped error alone would give 1.44).
    loss, stats = value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    assert float(loss) == pytest.approx(0.5 * 2.25) and float(stats["clipfrac"]) == 0.0


def test_clipped_losses_equal_a_plain_loop_on_random_tokens():
    """policy_loss and value_loss, their gradients and stats, against a per-token Python loop over ragged masks,
    with and without an n_tokens denominator (what a rank passes when the mean is over all ranks' tokens)."""
    gen = torch.Generator().manual_seed(11)
    B, T, clip = 4, 9, 0.2
    mask = (torch.rand(B, T, generator=gen) < 0.7).float()
    mask[0] = 0.0
    mask[0, 3] = 1.0
    lp_old, adv = torch.randn(B, T, generator=gen) * 0.5, torch.randn(B, T, generator=gen)
    lp_new = (lp_old + 0.3 * torch.randn(B, T, generator=gen)).requires_grad_()
    v_old, ret = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    v_new = (v_old + 0.4 * torch.randn(B, T, generator=gen)).requires_grad_()
    toks = [(b, t) for b in range(B) for t in range(T) if mask[b, t] == 1]
    lpn, vn = lp_new.detach(), v_new.detach()  # the loop's plain numbers
    for n_tokens in (None, torch.tensor(3 * len(toks))):
        denom = len(toks) if n_tokens is None else int(n_tokens)
        p_loss, p_grad, p_clipped, k3 = 0.0, torch.zeros(B, T), 0, []
        v_loss, v_grad, v_clipped = 0.0, torch.zeros(B, T), 0
        for b, t in toks:
            r = math.exp(float(lpn[b, t] - lp_old[b, t]))
            a = float(adv[b, t])
            un, cl = -a * r, -a * min(max(r, 1 - clip), 1 + clip)
            p_loss += max(un, cl) / denom
            p_grad[b, t] = (-a * r if un >= cl else 0.0) / denom  # d/dlogp of -A r is -A r; the clipped term is flat
            p_clipped += cl > un
            k3.append((r - 1) - math.log(r))
            v, vo, R = float(vn[b, t]), float(v_old[b, t]), float(ret[b, t])
            vc = vo + min(max(v - vo, -clip), clip)
            e_un, e_cl = (v - R) ** 2, (vc - R) ** 2
            v_loss += 0.5 * max(e_un, e_cl) / denom
            v_grad[b, t] = ((v - R) if e_un >= e_cl else (vc - R) * (abs(v - vo) < clip)) / denom
            v_clipped += e_cl > e_un
        lp_new.grad = v_new.grad = None
        loss, stats = policy_loss(lp_new, lp_old, adv, mask, clip=clip, n_tokens=n_tokens)
        loss.backward()
        assert loss.item() == pytest.approx(p_loss, rel=1e-5)
        assert torch.allclose(lp_new.grad, p_grad, atol=1e-6)
        assert float(stats["clipfrac"]) == pytest.approx(p_clipped / len(toks))
        assert float(stats["approx_kl"]) == pytest.approx(sum(k3) / len(toks), rel=1e-5)
        loss, stats = value_loss(v_new, v_old, ret, mask, clip=clip, n_tokens=n_tokens)
        loss.backward()
        assert loss.item() == pytest.approx(v_loss, rel=1e-5)
        assert torch.allclose(v_new.grad, v_grad, atol=1e-6)
        assert float(stats["clipfrac"]) == pytest.approx(v_clipped / len(toks))


def test_explained_variance():
    gen = torch.Generator().manual_seed(7)
    ret = torch.randn(3, 6, generator=gen)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    assert float(explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    const = torch.full_like(ret, 5.0)
    assert float(explained_variance(const, ret, mask)) == pytest.approx(0.0, abs=1e-6)
    v = ret + 0.5 * torch.randn(3, 6, generator=gen)
    r_np, v_np = ret[mask == 1].numpy(), v[mask == 1].numpy()
    assert float(explained_variance(v, ret, mask)) == pytest.approx(1 - np.var(r_np - v_np) / np.var(r_np), rel=1e-5)
    assert math.isnan(float(explained_variance(ret, torch.ones(3, 6), mask)))


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1, not clipped
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=0.0, n_steps=100)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 10_000))
    with pytest.raises(PPOError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
