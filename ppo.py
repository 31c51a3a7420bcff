"""
PPO for a language-model policy: the CCRL stage of the paper (§3.2), and the plain-PPO baseline.

    python ppo.py                                          # CCRL from ckpt/comt on the world's train split
    python ppo.py --init ckpt/cot --reward outcome --out ckpt/cot_ppo    # the CoT-SFT + PPO baseline
    python ppo.py --advantage grpo --samples-per-prompt 4  # critic-free group baselines instead of GAE
    python ppo.py --resume                                 # continue a stopped run exactly

One update, as the numbered steps of `ppo_step` read:
  1. take the next prompts_per_step problems (x samples_per_prompt),
  2. sample responses with the KV-cache sampler at temperature T (plain softmax, stop at EOS),
  3. score them with the policy's own forward (old log-probs, values) and the frozen reference,
  4. score the responses: outcome at the last token, + CCRL confidence terms at computed numbers,
  5. per-token rewards r_t = score_t - kl_coef * KL_t, then GAE (or group baselines), whitened,
  6. ppo_epochs passes of clipped policy loss + clipped value loss over shuffled minibatches,
  7. adapt the KL coefficient, 8. log.
The implementation details follow the PPO-for-LLM checklist (lm-human-preference-details, TRL,
OpenRLHF): left padding with positions from the mask, PAD != EOS, the same temperature for every
log-prob, k1 KL in the reward, zero-initialised value head, returns before whitening, token-level loss
aggregation, grad clipping, missing-EOS penalty, optional early stop on approx-KL.
"""
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from confidence import ccrl_reward_from_rollout
from data import answers_match, extract_answer, load_problems, parse_number, prompt_text
from model import Transformer, generate, left_pad, recover_dir
from sft import append_metrics, parse_config, trim_metrics

# ============================================================================= configuration


class PPOError(ValueError):
    """Bad input (a flag, a file, a tensor); the message is one line naming what was expected."""


@dataclass
class PPOConfig:
    init: str = "ckpt/comt"  # SFT checkpoint: the policy starts here, the frozen reference is a copy of it
    problems: str = "data/world/train.jsonl"  # prompts with gold answers (and intermediates for CCRL)
    eval_problems: str = "data/world/test_id.jsonl"  # greedy accuracy on these every eval_every updates
    eval_problems_n: int = 200  # how many of them
    out: str = "ckpt/comt_ccrl"  # checkpoint directory (policy in HF layout + value_head.safetensors)
    overwrite: bool = False  # allow replacing an existing checkpoint in out without --resume
    resume: bool = False  # continue from out exactly (policy, value head, optimizer, KL coef, step, RNG)
    value_init: str = ""  # a PPO checkpoint whose value head (and critic) to start from ("" = fresh head)
    # reward (paper §3.2; confidence.py)
    reward: str = "ccrl"  # outcome: answer correctness only | ccrl: + confidence terms on computed numbers
    alpha: float = 0.1  # CCRL: +alpha * confidence for a correct computed number
    beta: float = 0.2  # CCRL: -beta * confidence for a wrong one (beta > alpha)
    confidence_kind: str = "exp"  # exp: c = exp(-mean H) | norm: c = 1 - mean H / log V
    penalty: float = -1.0  # outcome score without a parsable answer or without EOS
    kl_coef: float = 0.05  # beta_KL of the per-token k1 penalty in the reward
    kl_target: float = 0.0  # > 0: adaptive KL coefficient steered to this KL per sequence (Ziegler et al.)
    kl_horizon: int = 10000  # adaptive controller horizon, in sequences
    # rollouts
    prompts_per_step: int = 32  # problems per PPO update
    samples_per_prompt: int = 1  # responses per problem (>1 needed for grpo / rloo)
    max_new_tokens: int = 256  # response budget; a response without EOS by then gets the penalty
    temperature: float = 1.0  # rollout temperature; old, new and reference log-probs use the same one
    # advantages and losses
    advantage: str = "gae"  # gae (value head) | grpo | rloo (group baselines, no critic)
    gamma: float = 1.0  # discount (1: every response token is one episode's step)
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # scale the per-token rewards by their batch std before GAE
    clip: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # value-prediction clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    critic: str = "head"  # head: value head on the policy trunk | separate: its own copy of the SFT model
    # optimisation
    steps: int = 100  # PPO updates (each: rollout, scoring, epochs x minibatches)
    ppo_epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 16  # sequences per gradient step
    lr: float = 1e-5  # policy learning rate
    critic_lr: float = 1e-4  # value head (and separate critic) learning rate
    grad_clip: float = 1.0  # global grad-norm clip
    target_kl: float = 0.0  # > 0: stop an update's epochs once approx-KL exceeds it
    # bookkeeping
    log_every: int = 1
    sample_every: int = 10  # print a table of sample responses every this many updates
    eval_every: int = 25  # 0 = only at the end
    save_every: int = 25  # 0 = only at the end
    stop_at: int = 0  # save and stop after this update (0 = run to the end)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA) | float32 | bfloat16
    attn: str = "sdpa"


def check_config(cfg: PPOConfig):
    def bad(msg):
        raise PPOError(msg)
    if cfg.reward not in ("outcome", "ccrl"):
        bad(f"--reward {cfg.reward!r}: expected outcome or ccrl")
    if cfg.advantage not in ("gae", "grpo", "rloo"):
        bad(f"--advantage {cfg.advantage!r}: expected gae, grpo or rloo")
    if cfg.advantage != "gae" and cfg.samples_per_prompt < 2:
        bad(f"--advantage {cfg.advantage} needs --samples-per-prompt >= 2 (got {cfg.samples_per_prompt})")
    if cfg.reward == "ccrl" and not 0 <= cfg.alpha < cfg.beta:
        bad(f"--alpha {cfg.alpha} --beta {cfg.beta}: expected 0 <= alpha < beta (wrong numbers cost more)")
    if cfg.critic not in ("head", "separate"):
        bad(f"--critic {cfg.critic!r}: expected head or separate")
    if cfg.confidence_kind not in ("exp", "norm"):
        bad(f"--confidence-kind {cfg.confidence_kind!r}: expected exp or norm")
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "steps", "ppo_epochs", "minibatch_size"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive integer")
    for name in ("temperature", "clip", "value_clip", "lr", "critic_lr"):
        if not getattr(cfg, name) > 0:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive number")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1) or cfg.kl_coef < 0:
        bad(f"--gamma {cfg.gamma} --lam {cfg.lam} --kl-coef {cfg.kl_coef}: expected gamma, lam in [0, 1], kl_coef >= 0")


# ============================================================================= PPO math
# Pure tensor functions, no model and no I/O. Shapes: B rows, T token positions, V vocabulary.
# `mask` (B, T) is 1 on the response tokens that count (EOS included) and 0 on prompt and padding.
#
# Aggregation: every loss and statistic is a token-level masked mean over the whole minibatch,
# sum(x * mask) / sum(mask), so each response token weighs the same whatever its sequence's length.
# A per-sequence mean first (mean over a row, then over rows) gives a token of a short answer more
# weight than a token of a long one, a length bias discussed by DAPO (arXiv 2503.14476) and Dr. GRPO
# (arXiv 2503.20783); token-level is also OpenRLHF's default.


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): logits (B, T, V), tokens (B, T) -> (B, T) fp32.

    Same as log_softmax(z).gather(tokens) but computed as z[token] - logsumexp(z), one row at a time, so
    no (B, T, V) log-probability tensor and at most one (T, V) fp32 copy of a bf16 row exist at once.
    The temperature must be the rollout's: old, new and reference log-probs all divide by it, or the
    ratio and the KL compare different distributions (a classic source of negative KL).
    """
    out = []
    for row, tok in zip(logits, tokens):  # row (T, V), tok (T,)
        z = row.float() / temperature
        out.append(z.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(out)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position: (B, T, V) -> (B, T) fp32.

    H = -sum p log p = logsumexp(z) - sum softmax(z) * z, which needs no log-probability tensor.
    """
    out = []
    for row in logits:  # (T, V)
        z = row.float() / temperature
        lse = torch.logsumexp(z, dim=-1)
        out.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.stack(out)  # (B, T)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from log-probs of the sampled tokens (J. Schulman,
    "Approximating KL divergence", joschu.net/blog/kl-approx.html). With d = logp - ref_logp:
    k1 = d (unbiased, may be negative per token; the one that belongs in the reward),
    k2 = d^2 / 2 (biased, low variance), k3 = exp(-d) - 1 + d (unbiased, always >= 0).
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = d.clamp(-20.0, 20.0)  # exp(20) is large but finite in fp32; beyond it the estimate is noise anyway
        return torch.exp(-d) - 1.0 + d
    raise PPOError(f"kl_penalty: unknown kind {kind!r}, expected 'k1', 'k2' or 'k3'")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all dims); 0 when the mask is empty."""
    m = mask.bool()
    # where, not x * mask: padded positions may hold inf or nan (log-probs of pad tokens)
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the positions where mask is 1; Bessel-corrected (n / (n - 1)) as TRL does,
    except for a single valid entry, which has variance 0."""
    m = mask.bool()
    centered = torch.where(m, x - masked_mean(x, mask), 0.0)
    var = masked_mean(centered * centered, mask)
    n = m.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid entries; shift_mean=False adds the mean back (scale only, as LHP
    does for rewards). Zero off the mask. When all valid entries are equal the std is 0 and the result
    is 0 (or the mean), not a division by zero: x - mean is 0 there, and eps keeps the scale finite."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0.0)


def compute_rewards(score_tokens: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, kl_kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = score_t - kl_coef * KL_t on response tokens, 0 elsewhere (all (B, T)).

    score_tokens is what confidence.ccrl_reward returns (outcome at the last token, confidence terms at
    numbers' last tokens). KL is the k1 estimator by default: unbiased for the reverse KL, the form
    LHP / TRL / OpenRLHF put in the reward. Returns (rewards, kl), kl masked, for logging.
    """
    kl = torch.where(mask.bool(), kl_penalty(logp, ref_logp, kl_kind), 0.0)
    rewards = torch.where(mask.bool(), score_tokens - kl_coef * kl, 0.0)
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens, all (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}
    i.e. A_t = sum_k (gamma*lam)^k delta_{t+k}. The valid tokens of a row must be one contiguous run;
    values and rewards are zeroed off the mask, so the value after a row's last token is 0 (the episode
    ends there) and nothing beyond it leaks in. Returns (advantages, returns = advantages + values),
    both zero off the mask; returns are the value targets, taken before any advantage whitening.
    """
    m = mask.to(values.dtype)
    runs = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]  # 0 -> 1 transitions per row
    if (runs > 1).any():
        raise PPOError("compute_gae: expected each row's mask to be one contiguous run of response tokens")
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * m  # positions before the response carry A of its first token; drop them
    return advantages, (advantages + values) * m


def group_advantages(scores: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Critic-free advantages from G samples per prompt: scores (B,), rows [g*G, (g+1)*G) one group -> (B,).

    grpo (DeepSeekMath): (r - mean_group) / (std_group + eps), std with Bessel's correction as torch.std.
    rloo (Ahmadian et al. 2024): r - mean of the other G - 1 members = G / (G - 1) * (r - mean_group).
    The caller broadcasts the result over the row's response tokens.
    """
    if group_size < 2 or scores.dim() != 1 or scores.shape[0] % group_size:
        raise PPOError(f"group_advantages: expected scores (B,) with B a multiple of group_size >= 2, "
                       f"got shape {tuple(scores.shape)}, group_size {group_size}")
    r = scores.float().view(-1, group_size)  # (B/G, G)
    mean = r.mean(1, keepdim=True)
    if kind == "grpo":
        adv = (r - mean) / (r.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        raise PPOError(f"group_advantages: unknown kind {kind!r}, expected 'grpo' or 'rloo'")
    return adv.reshape(-1)  # (B,)


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO, Schulman et al. 2017), all inputs (B, T):
    loss = mean_t max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)),  ratio = exp(logp_new - logp_old).

    Stats (detached 0-dim tensors): clipfrac (share of tokens where the clipped term is the larger),
    approx_kl = mean((ratio - 1) - log ratio) (k3 of old -> new), ratio mean and variance. At the first
    minibatch of an epoch ratio should be 1 and approx_kl 0 exactly.
    """
    log_ratio = (logp_new - logp_old).clamp(-20.0, 20.0)  # a stale or pad token must not overflow exp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (LHP / TRL), all (B, T):
    0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2).
    Stats: clipfrac, the share of tokens where the clipped error is the larger one."""
    v_clipped = values_old + (values_new - values_old).clamp(-clip, clip)
    err = (values_new - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 perfect, 0 no better than a constant, < 0 worse;
    nan when the returns do not vary."""
    var_r = masked_var(returns, mask)
    if var_r == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask) / var_r


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", §2.2): beta <- beta * (1 + e * n_steps / horizon), with the proportional
    error e = clip(KL / target - 1, -0.2, 0.2). Too much KL raises beta, too little lowers it."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise PPOError(f"AdaptiveKLController: expected positive init_kl_coef, target, horizon, "
                           f"got {init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ============================================================================= policy and critic


class ValueModel(nn.Module):
    """The critic: a scalar head on final hidden states (B, T, d) -> (B, T). Zero-initialised, so every
    value starts at 0 and the first advantages are the rewards-to-go (LHP / the N+ details). With
    critic='separate' it reads the hidden states of its own copy of the SFT model."""

    def __init__(self, hidden_size: int, trunk: Optional[Transformer] = None):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden, ids, attn_mask):
        if self.trunk is not None:
            _, hidden = self.trunk(ids, attention_mask=attn_mask, return_hidden=True)
        return self.head(hidden.float()).squeeze(-1)


def forward_response(policy, critic, ids, attn_mask, P: int, tokens, temperature: float):
    """One forward of [prompt | response] (B, P+N) -> log-probs (B, N) of the response tokens at the
    rollout temperature, and values (B, N). Logits at column t predict token t+1, so response token i
    (column P+i) is scored by column P+i-1, which is also the state the critic values for it."""
    logits, hidden = policy(ids, attention_mask=attn_mask, return_hidden=True)
    N = tokens.shape[1]
    logp = logprobs_from_logits(logits[:, P - 1:P - 1 + N], tokens, temperature)  # (B, N)
    values = critic(hidden[:, P - 1:P - 1 + N], ids, attn_mask) if critic is not None else None
    if values is not None and critic.trunk is not None:
        values = values[:, P - 1:P - 1 + N]
    return logp, values


# ============================================================================= one PPO update


def ppo_step(step: int, cfg: PPOConfig, ctx) -> dict:
    policy, ref, critic, tok, opt = ctx["policy"], ctx["ref"], ctx["critic"], ctx["tok"], ctx["opt"]
    device, autocast, problems = ctx["device"], ctx["autocast"], ctx["problems"]
    G = cfg.samples_per_prompt
    t0 = time.time()

    # 1. Prompts: this update's problems, a pure function of (seed, step) so --resume replays exactly.
    batch = [problems[i] for i in problem_indices(len(problems), cfg.prompts_per_step, cfg.seed, step)]
    batch = [p for p in batch for _ in range(G)]  # G consecutive samples of each problem (a group)
    prompts = [tok.render(prompt_text(p))[0] for p in batch]

    # 2. Rollouts with the KV-cache sampler: plain softmax at temperature T, stop at EOS, PAD != EOS.
    policy.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    g = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=tok.stop_ids,
                 pad_id=tok.pad_id, generator=gen)
    p_ids, p_mask = left_pad(prompts, tok.pad_id, device)
    P = p_ids.shape[1]
    ids = torch.cat([p_ids, g.tokens], 1)  # (B, P+N)
    attn = torch.cat([p_mask, g.mask], 1)
    mask = g.mask.float()  # (B, N) response tokens, EOS included
    t_rollout = time.time() - t0

    # 3. Old log-probs and values with the very forward the update uses (so the first ratio is exactly
    #    1), reference log-probs from the frozen SFT model, all at the rollout temperature.
    t1 = time.time()
    with torch.no_grad(), autocast:
        old_logp, old_values = minibatched(lambda s: forward_response(policy, critic, ids[s], attn[s], P,
                                                                       g.tokens[s], cfg.temperature), len(batch), cfg.minibatch_size)
        ref_logp, _ = minibatched(lambda s: forward_response(ref, None, ids[s], attn[s], P, g.tokens[s],
                                                             cfg.temperature), len(batch), cfg.minibatch_size)

    # 4. Scores (paper §3.2): outcome at the last token; with --reward ccrl also +alpha*c / -beta*c at
    #    each computed number's last token, c from the sampling entropies of its tokens.
    texts = [response_text(tok, g.tokens[b][g.mask[b].bool()].tolist()) for b in range(len(batch))]
    preds = [extract_answer(t) for t in texts]
    correct = [None if a is None else answers_match(a, p["answer"]) for a, p in zip(preds, batch)]
    alpha, beta = (cfg.alpha, cfg.beta) if cfg.reward == "ccrl" else (0.0, 0.0)
    scores, breakdown, numbers = ccrl_reward_from_rollout(
        g.tokens, g.mask, g.entropies, [p["question"] for p in batch],
        [[p["answer"], *p.get("intermediates", [])] for p in batch], correct, g.finished.tolist(),
        tok.token_bytes, stop_ids=tok.stop_ids, alpha=alpha, beta=beta, penalty=cfg.penalty,
        kind=cfg.confidence_kind, vocab_size=tok.vocab_size)
    scores = scores.to(device)

    # 5. Per-token rewards r_t = score_t - kl_coef * (log pi - log pi_ref)_t, then advantages.
    kl_coef = ctx["kl"].value
    rewards, kl = compute_rewards(scores, old_logp, ref_logp, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if cfg.advantage == "gae":
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    else:  # one number per sequence from its group, the same on each of its tokens
        seq_adv = group_advantages((rewards * mask).sum(1), G, cfg.advantage)
        advantages, returns = seq_adv[:, None] * mask, None

    # 6. PPO epochs over shuffled minibatches: clipped policy loss (+ clipped value loss).
    policy.train()
    stats, first = [], None
    perm_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(len(batch), generator=perm_gen)
        epoch_kl = []
        for k in range(0, len(batch), cfg.minibatch_size):
            s = perm[k:k + cfg.minibatch_size].to(device)
            with autocast:
                logp, values = forward_response(policy, critic, ids[s], attn[s], P, g.tokens[s], cfg.temperature)
            pl, st = policy_loss(logp, old_logp[s], advantages[s], mask[s], cfg.clip)
            loss = pl
            if returns is not None:
                vl, vst = value_loss(values, old_values[s], returns[s], mask[s], cfg.value_clip)
                loss = loss + cfg.vf_coef * vl
                st = {**st, "value_loss": vl.detach(), "value_clipfrac": vst["clipfrac"]}
            loss.backward()
            st["grad_norm"] = torch.nn.utils.clip_grad_norm_(ctx["params"], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            st = {k2: float(v) for k2, v in {**st, "policy_loss": pl.detach()}.items()}
            if first is None:
                first = st  # ratio must be 1 and approx_kl 0 here: the old log-probs came from this forward
            stats.append(st)
            epoch_kl.append(st["approx_kl"])
        if cfg.target_kl and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:
            break
    t_update = time.time() - t1

    # 7. Adapt the KL coefficient to the measured KL per sequence.
    kl_seq = float((kl * mask).sum(1).mean())
    ctx["kl"].update(kl_seq, len(batch))

    # 8. Metrics (glossary in README.md).
    mean = lambda key: sum(s[key] for s in stats) / len(stats)
    n_tok = int(mask.sum())
    row = {
        "step": step + 1,
        "score": float(torch.tensor([b["outcome"] for b in breakdown]).mean()),
        "accuracy": sum(c is True for c in correct) / len(correct),
        "confidence_bonus": sum(b["confidence_bonus"] for b in breakdown) / len(breakdown),
        "computed_per_response": sum(b["n_computed"] for b in breakdown) / len(breakdown),
        "computed_correct_frac": sum(b["n_correct"] for b in breakdown) / max(1, sum(b["n_computed"] for b in breakdown)),
        "reward": float((rewards * mask).sum(1).mean()),
        "kl": kl_seq,
        "kl_k3": float((kl_penalty(old_logp, ref_logp, "k3") * mask).sum(1).mean()),
        "kl_coef": kl_coef,
        "entropy": float(masked_mean(g.entropies, mask)),
        "gen_logprob_gap": float(masked_mean((g.logprobs - old_logp).abs(), mask)),
        "approx_kl": mean("approx_kl"), "clipfrac": mean("clipfrac"), "ratio": mean("ratio"),
        "ratio_var": mean("ratio_var"), "first_ratio": first["ratio"], "first_approx_kl": first["approx_kl"],
        "policy_loss": mean("policy_loss"), "grad_norm": mean("grad_norm"),
        "response_len": n_tok / len(batch), "eos_frac": float(g.finished.float().mean()),
        "rollout_s": t_rollout, "update_s": t_update, "tok_per_s": n_tok / max(t_rollout, 1e-9),
        "minibatches": len(stats),
    }
    if returns is not None:
        row.update(value_loss=mean("value_loss"), value_clipfrac=mean("value_clipfrac"),
                   explained_variance=float(explained_variance(old_values, returns, mask)))
    ctx["samples"] = [(p["question"], t, c, b) for p, t, c, b in zip(batch, texts, correct, breakdown)]
    return row


def response_text(tok, ids: list[int]) -> str:
    """The response as text, without its stop token (whose text would end up glued to the answer)."""
    return tok.decode([i for i in ids if i not in tok.stop_ids])


def minibatched(fn, B: int, size: int):
    """Run fn on row slices of at most `size` rows and concatenate its (B_i, N) outputs."""
    outs = [fn(slice(k, min(B, k + size))) for k in range(0, B, size)]
    return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))


def problem_indices(n: int, k: int, seed: int, step: int) -> list[int]:
    """Problems for update `step`: walk through per-epoch permutations, k at a time."""
    start = step * k
    out = []
    while len(out) < k:
        epoch, off = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[off:off + k - len(out)]
    return out


# ============================================================================= setup, loop, I/O


def setup(cfg: PPOConfig):
    """Validate every input before anything is written."""
    from tokenizer import Tokenizer
    check_config(cfg)
    out = Path(cfg.out)
    recover_dir(out)
    if cfg.resume and not (out / "train_state.pt").exists():
        raise PPOError(f"{out}: --resume given but there is no checkpoint with train_state.pt to resume from")
    if (out / "config.json").exists() and not cfg.resume and not cfg.overwrite:
        raise PPOError(f"{out}: a checkpoint already exists; pass --resume to continue it or --overwrite")
    for d in [cfg.init] + ([cfg.value_init] if cfg.value_init else []):
        if not (Path(d) / "config.json").exists():
            raise PPOError(f"--init {d}: not a checkpoint directory (no config.json)")
    head_from = str(out) if cfg.resume else cfg.value_init
    if head_from and cfg.advantage == "gae" and not (Path(head_from) / "value_head.safetensors").exists():
        raise PPOError(f"{head_from}: no value_head.safetensors; a critic is required (--advantage gae)")
    problems = load_problems(cfg.problems)
    for p in problems:
        if parse_number(str(p.get("answer", ""))) is None:
            raise PPOError(f"{cfg.problems}: problem {p.get('id')!r} has no numeric answer; PPO needs gold answers")
    eval_problems = load_problems(cfg.eval_problems)[:cfg.eval_problems_n] if cfg.eval_problems else []
    tok = Tokenizer.load(cfg.init)
    policy = Transformer.from_pretrained(str(out) if cfg.resume else cfg.init, attn=cfg.attn)
    ref = Transformer.from_pretrained(cfg.init, attn=cfg.attn).requires_grad_(False).eval()
    critic = None
    if cfg.advantage == "gae":
        trunk = Transformer.from_pretrained(cfg.init, attn=cfg.attn) if cfg.critic == "separate" else None
        critic = ValueModel(policy.config.hidden_size, trunk)
        if head_from:
            load_critic(critic, head_from)
    return tok, policy, ref, critic, problems, eval_problems


def save_critic(critic: ValueModel, d: Path):
    from safetensors.torch import save_file
    save_file({k: v.detach().float().cpu().contiguous() for k, v in critic.head.state_dict().items()},
              str(d / "value_head.safetensors"))
    if critic.trunk is not None:
        critic.trunk.save_pretrained(d / "critic")


def load_critic(critic: ValueModel, d: str):
    from safetensors.torch import load_file
    state = load_file(str(Path(d) / "value_head.safetensors"))
    if state["weight"].shape != critic.head.weight.shape:
        raise PPOError(f"{d}/value_head.safetensors: weight shape {tuple(state['weight'].shape)}, "
                       f"expected {tuple(critic.head.weight.shape)}")
    critic.head.load_state_dict(state)
    if critic.trunk is not None:
        if not (Path(d) / "critic" / "config.json").exists():
            raise PPOError(f"{d}: no critic/ checkpoint; needed with --critic separate")
        critic.trunk.load_state_dict(Transformer.from_pretrained(Path(d) / "critic").state_dict())


def train(cfg: PPOConfig):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    tok, policy, ref, critic, problems, eval_problems = setup(cfg)
    out = Path(cfg.out)
    policy.to(device), ref.to(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device == "cuda")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr}]
    if critic is not None:
        critic.to(device)
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic_lr})
    # Adam eps 1e-5 as in cleanrl / LHP; no weight decay: the KL penalty is the regulariser here.
    opt = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
    kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else FixedKLController(cfg.kl_coef)
    step, wall = 0, 0.0
    if cfg.resume:
        st = torch.load(out / "train_state.pt", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        step, wall, kl.value = st["step"], st["wall_time_s"], st["kl_coef"]
        trim_metrics(out, step)
        print(f"resumed {out} at update {step}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    params = [p for g_ in groups for p in g_["params"]]
    ctx = dict(policy=policy, ref=ref, critic=critic, tok=tok, opt=opt, device=device, autocast=autocast,
               problems=problems, kl=kl, params=params)
    print(f"policy {policy.num_params() / 1e6:.2f}M params from {cfg.init} | {len(problems)} problems | "
          f"reward {cfg.reward} | advantage {cfg.advantage} | {cfg.steps} updates x "
          f"{cfg.prompts_per_step * cfg.samples_per_prompt} responses | device {device}{' bf16' if use_bf16 else ''}")
    print(json.dumps(asdict(cfg)))

    def save():
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "step": step, "wall_time_s": wall, "kl_coef": kl.value}, buf)

        def extra(tmp: Path):
            tok.save(tmp)
            (tmp / "train_state.pt").write_bytes(buf.getvalue())
            (tmp / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            if critic is not None:
                save_critic(critic, tmp)

        policy.save_pretrained(out, dtype=torch.float32, extra=extra)

    bar = tqdm(total=cfg.steps, initial=step, desc="ppo", dynamic_ncols=True, disable=None)
    while step < cfg.steps:
        t0 = time.time()
        row = ppo_step(step, cfg, ctx)
        step += 1
        wall += time.time() - t0
        row["wall_time_s"] = wall
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            bar.write(f"update {step}/{cfg.steps} score {row['score']:.3f} acc {row['accuracy']:.3f} "
                      f"kl {row['kl']:.3f} ent {row['entropy']:.3f} approx_kl {row['approx_kl']:.4f} "
                      f"clipfrac {row['clipfrac']:.3f} len {row['response_len']:.0f} eos {row['eos_frac']:.2f} "
                      f"tok/s {row['tok_per_s']:,.0f}")
        if cfg.sample_every and step % cfg.sample_every == 0:
            for q, text, ok, b in ctx["samples"][:2]:
                bar.write(f"  Q: {q}\n  A: {text!r}\n  correct={ok} outcome={b['outcome']} bonus={b['confidence_bonus']:.3f}")
        if eval_problems and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            from eval import evaluate
            res = evaluate(policy.eval(), tok, eval_problems, batch_size=64, max_new_tokens=cfg.max_new_tokens, progress=False)
            row["eval_accuracy"] = res["accuracy"]
            bar.write(f"  eval accuracy {res['accuracy']:.4f} on {len(eval_problems)} problems")
        append_metrics(out, row)
        if (cfg.save_every and step % cfg.save_every == 0) or step in (cfg.steps, cfg.stop_at):
            save()
        if step == cfg.stop_at:
            break
    bar.close()
    print(f"done: {step} updates in {wall:.1f}s; checkpoint in {out}")


def parse_args(argv=None) -> PPOConfig:
    return parse_config(PPOConfig, __doc__, argv)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
