"""
PPO for a language-model policy: the CCRL stage of the paper (§3.2), and the plain-PPO baseline.

    python ppo.py                                          # CCRL from ckpt/comt on the world's train split
    python ppo.py --init ckpt/cot --reward outcome --out ckpt/cot_ppo    # the CoT-SFT + PPO baseline
    python ppo.py --advantage grpo --samples-per-prompt 4  # critic-free group baselines instead of GAE
    python ppo.py --resume                                 # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=8 ppo.py --fsdp # many GPUs: each rank its own rollouts

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from confidence import ccrl_reward_from_rollout
from data import grade_answer, load_problems, parse_number, prompt_text
from cross_entropy import chunked_token_logprobs
from model import Block, Transformer, check_out_dir, generate, left_pad, resolve_device
from sft import (all_sum, append_metrics, clip_grad_norm, init_distributed, lm_head_weight, load_optimizer_state,
                 parse_config, training_state, trim_metrics, wrap_for_training)

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
    shuffle_scores: bool = False  # control run: each rollout's score goes to another rollout of its update (no signal)
    # rollouts
    prompts_per_step: int = 32  # problems per PPO update
    samples_per_prompt: int = 1  # responses per problem (>1 needed for grpo / rloo)
    max_new_tokens: int = 256  # response budget; a response without EOS by then gets the penalty
    temperature: float = 1.0  # rollout temperature; old, new and reference log-probs use the same one
    compile: bool = False  # CUDA: rollouts with the compiled decode step (a CUDA graph per batch shape; not FSDP)
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
    fsdp: bool = False  # under torchrun: shard policy, critic and reference (FSDP2) instead of DDP


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
    if cfg.compile and cfg.fsdp:  # a CUDA graph replays fixed weight addresses; FSDP gathers them anew
        bad("--compile with --fsdp: the compiled decode step needs unsharded weights; drop one of them")
    if cfg.confidence_kind not in ("exp", "norm"):
        bad(f"--confidence-kind {cfg.confidence_kind!r}: expected exp or norm")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad(f"--dtype {cfg.dtype!r}: expected auto, float32 or bfloat16")
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "steps", "ppo_epochs", "minibatch_size",
                 "log_every", "eval_problems_n", "kl_horizon"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive integer")
    for name in ("sample_every", "eval_every", "save_every", "stop_at", "target_kl", "kl_target", "grad_clip"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a number >= 0")
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all dims); 0 when the mask is empty.
    reduce: applied to the sum and the count before dividing; with sft.all_sum (a sum over ranks) it
    is the mean over every rank's valid entries (statistics only: the result carries no gradient)."""
    m = mask.bool()
    # where, not x * mask: padded positions may hold inf or nan (log-probs of pad tokens)
    total, n = torch.where(m, x, 0.0).sum(), m.sum()
    if reduce is not None:
        total, n = reduce(total), reduce(n)
    return total / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce=None) -> torch.Tensor:
    """Variance of x over the positions where mask is 1; Bessel-corrected (n / (n - 1)) as TRL does,
    except for a single valid entry, which has variance 0. reduce: as in masked_mean."""
    m = mask.bool()
    centered = torch.where(m, x - masked_mean(x, mask, reduce), 0.0)
    var = masked_mean(centered * centered, mask, reduce)
    n = m.sum() if reduce is None else reduce(m.sum())
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce=None) -> torch.Tensor:
    """(x - mean) / std over the valid entries; shift_mean=False adds the mean back (scale only, as LHP
    does for rewards). Zero off the mask. When all valid entries are equal the std is 0 and the result
    is 0 (or the mean), not a division by zero: x - mean is 0 there, and eps keeps the scale finite.
    reduce: as in masked_mean (whitening statistics over all ranks' tokens)."""
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce=reduce)
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


def shuffled_scores(scores: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The negative control: row b's total score, placed at the last response token of row perm[b] for a
    random permutation perm. The update then sees rewards of the same size and spread as the real run,
    with no relation to what each response says: what PPO's updates do to a policy on their own, to hold
    a real run against. scores, mask (B, T); returns (B, T)."""
    totals = scores.sum(1)  # (B,)
    perm = torch.randperm(len(totals), generator=generator).to(scores.device)
    last = mask.long().cumsum(1).argmax(1)  # (B,) each row's last response token (the first index of its max)
    out = torch.zeros_like(scores)
    out[perm, last[perm]] = totals
    return out


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


def token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens=None) -> torch.Tensor:
    """The loss aggregation: sum of x over valid tokens / n_tokens (default: their count here). With
    n_tokens = the count over all ranks, it is this rank's share of the all-rank token mean, and the
    gradient flows through this rank's tokens only."""
    if n_tokens is None:
        return masked_mean(x, mask)
    return torch.where(mask.bool(), x, 0.0).sum() / n_tokens.clamp(min=1)


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, n_tokens=None, reduce=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO, Schulman et al. 2017), all inputs (B, T):
    loss = mean_t max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)),  ratio = exp(logp_new - logp_old).

    Stats (detached 0-dim tensors): clipfrac (share of tokens where the clipped term is the larger),
    approx_kl = mean((ratio - 1) - log ratio) (k3 of old -> new), ratio mean and variance. At the first
    minibatch of an epoch ratio should be 1 and approx_kl 0 exactly. Many ranks: n_tokens as in
    token_mean, reduce as in masked_mean (the stats are then all-rank values).
    """
    log_ratio = (logp_new - logp_old).clamp(-20.0, 20.0)  # a stale or pad token must not overflow exp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask, reduce),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask, reduce),
            "ratio": masked_mean(ratio, mask, reduce),
            "ratio_var": masked_var(ratio, mask, reduce=reduce),
        }
    return loss, stats


def value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, n_tokens=None, reduce=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (LHP / TRL), all (B, T):
    0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2).
    Stats: clipfrac, the share of tokens where the clipped error is the larger one. n_tokens, reduce:
    as in policy_loss."""
    # = V_old + clip(V - V_old, -c, c), written as a clamp of V so that an unclipped value is V bit for
    # bit and the clipped error ties the plain one exactly (the clip fraction counts no rounding noise)
    v_clipped = torch.maximum(torch.minimum(values_new, values_old + clip), values_old - clip)
    err = (values_new - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), mask, n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask, reduce)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 perfect, 0 no better than a constant, < 0 worse;
    nan when the returns do not vary."""
    var_r = masked_var(returns, mask, reduce=reduce)
    if var_r == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask, reduce=reduce) / var_r


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
        if trunk is not None and not trunk.config.tie_word_embeddings:
            trunk.lm_head.requires_grad_(False)  # the critic never uses its LM head (and DDP wants no idle weights)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden, ids, attn_mask):
        if self.trunk is not None:
            hidden = self.trunk(ids, attention_mask=attn_mask, logits=False)
        return self.head(hidden.float()).squeeze(-1)


def forward_response(policy, critic, ids, attn_mask, P: int, tokens, temperature: float):
    """One forward of [prompt | response] (B, P+N) -> log-probs (B, N) of the response tokens at the
    rollout temperature, and values (B, N). Logits at column t predict token t+1, so response token i
    (column P+i) is scored by column P+i-1, which is also the state the critic values for it."""
    N = tokens.shape[1]
    hidden = policy(ids, attention_mask=attn_mask, logits=False)[:, P - 1:P - 1 + N]  # (B, N, d)
    # the (B, N, V) logits exist one chunk of rows at a time (recomputed in backward), as sft.py's loss
    logp = chunked_token_logprobs(hidden, lm_head_weight(policy), tokens, temperature)  # (B, N) fp32
    values = critic(hidden, ids, attn_mask) if critic is not None else None
    if values is not None and getattr(critic, "module", critic).trunk is not None:  # (critic may be DDP-wrapped)
        values = values[:, P - 1:P - 1 + N]
    return logp, values


# ============================================================================= one PPO update


def rollout(policy, tok, batch: list[dict], cfg: PPOConfig, step: int, rank: int = 0, across_ranks: bool = False):
    """Sample one response per row of batch with the KV-cache sampler: plain softmax at the rollout
    temperature, stop at EOS, PAD != EOS. Seeded by (seed, step, rank), so --resume replays it and
    every rank draws different samples. Returns (prompt ids (B, P) left-padded, their mask, Generation)."""
    device = policy.lm_head.weight.device
    prompts = [tok.render(prompt_text(p))[0] for p in batch]
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step + 7_919 * rank)
    g = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=tok.stop_ids,
                 pad_id=tok.pad_id, generator=gen, across_ranks=across_ranks, compile=cfg.compile)
    p_ids, p_mask = left_pad(prompts, tok.pad_id, device)
    return p_ids, p_mask, g


@contextmanager
def gathered(model, on: bool):
    """FSDP: each decoder block keeps its full weights from its first forward until the block ends,
    instead of all-gathering them again at every decode step. (The root unit, embeddings and head,
    stays gathered after its forward anyway.) Costs one full copy of the blocks per rank meanwhile."""
    blocks = [m for m in model.modules() if isinstance(m, Block)] if on else []
    for b in blocks:
        b.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for b in blocks:
            b.set_reshard_after_forward(True, recurse=False)
            b.reshard()


def ppo_step(step: int, cfg: PPOConfig, ctx) -> dict:
    policy, ref, critic, tok, opt = ctx["policy"], ctx["ref"], ctx["critic"], ctx["tok"], ctx["opt"]
    device, autocast, problems = ctx["device"], ctx["autocast"], ctx["problems"]
    rank, world, fsdp = ctx["rank"], ctx["world"], ctx["fsdp"]
    train_policy, train_critic = ctx["train_policy"], ctx["train_critic"]  # the DDP / FSDP wrappers
    reduce = all_sum if world > 1 else None  # statistics over all ranks' rows
    G = cfg.samples_per_prompt
    t0 = time.time()

    # 1. Prompts: this update's problems, a pure function of (seed, step) so --resume replays exactly.
    #    N ranks take consecutive slices of N x prompts_per_step problems: one rank with N times the batch.
    k = cfg.prompts_per_step
    idx = problem_indices(len(problems), k * world, cfg.seed, step)[rank * k:(rank + 1) * k]
    batch = [problems[i] for i in idx]
    batch = [p for p in batch for _ in range(G)]  # G consecutive samples of each problem (a group)

    # 2. Rollouts (under FSDP every rank decodes until all ranks are done: each forward is a collective).
    policy.eval()
    with autocast, gathered(policy, fsdp):
        p_ids, p_mask, g = rollout(policy, tok, batch, cfg, step, rank, across_ranks=fsdp)
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
    correct = [grade_answer(t, p["answer"]) for t, p in zip(texts, batch)]  # None: no parsable answer
    alpha, beta = (cfg.alpha, cfg.beta) if cfg.reward == "ccrl" else (0.0, 0.0)
    scores, breakdown, numbers = ccrl_reward_from_rollout(
        g.tokens, g.mask, g.entropies, [p["question"] for p in batch],
        [[p["answer"], *p.get("intermediates", [])] for p in batch], correct, g.finished.tolist(),
        tok.token_bytes, stop_ids=tok.stop_ids, alpha=alpha, beta=beta, penalty=cfg.penalty,
        kind=cfg.confidence_kind, vocab_size=tok.vocab_size)
    scores = scores.to(device)
    if cfg.shuffle_scores:  # the control run: same scores, handed to the wrong responses
        gen = torch.Generator().manual_seed((cfg.seed * 1009 + rank) * 100003 + step)  # replays under --resume
        scores = shuffled_scores(scores, g.mask, gen)

    # 5. Per-token rewards r_t = score_t - kl_coef * (log pi - log pi_ref)_t, then advantages; the
    #    whitening statistics are over all ranks' tokens.
    kl_coef = ctx["kl"].value
    rewards, kl = compute_rewards(scores, old_logp, ref_logp, mask, kl_coef)
    logged_rewards = rewards  # the `reward` metric: score - kl_coef * KL, whatever the whitening below does
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    if cfg.advantage == "gae":
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    else:  # one number per sequence from its group, the same on each of its tokens
        seq_adv = group_advantages((rewards * mask).sum(1), G, cfg.advantage)
        advantages, returns = seq_adv[:, None] * mask, None
    ctx["advantages"] = advantages  # for inspection (tests)

    # 6. PPO epochs over shuffled minibatches: clipped policy loss (+ clipped value loss). A minibatch
    #    is every rank's next minibatch_size rows; each rank's loss is its share of the token mean over
    #    all of them, scaled by world because DDP / FSDP average the ranks' gradients.
    policy.train()
    stats, first = [], None
    perm_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(len(batch), generator=perm_gen)
        epoch_kl = []
        for k in range(0, len(batch), cfg.minibatch_size):
            s = perm[k:k + cfg.minibatch_size].to(device)
            n_tokens = all_sum(mask[s].sum())
            with autocast:
                logp, values = forward_response(train_policy, train_critic, ids[s], attn[s], P, g.tokens[s], cfg.temperature)
            pl, st = policy_loss(logp, old_logp[s], advantages[s], mask[s], cfg.clip, n_tokens, reduce)
            loss = pl
            if returns is not None:
                vl, vst = value_loss(values, old_values[s], returns[s], mask[s], cfg.value_clip, n_tokens, reduce)
                loss = loss + cfg.vf_coef * vl
                st = {**st, "value_loss": all_sum(vl.detach()), "value_clipfrac": vst["clipfrac"]}
            (loss * world).backward()
            st["grad_norm"] = clip_grad_norm(ctx["params"], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            st = {k2: float(v) for k2, v in {**st, "policy_loss": all_sum(pl.detach())}.items()}
            if first is None:
                first = st  # ratio must be 1 and approx_kl 0 here: the old log-probs came from this forward
            stats.append(st)
            epoch_kl.append(st["approx_kl"])
        if cfg.target_kl and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:  # the same on every rank
            break
    t_update = time.time() - t1

    # 7. Adapt the KL coefficient to the measured KL per sequence. It and every metric below come from
    #    sums over all ranks' rows and tokens, reduced in one call.
    f64 = lambda xs: torch.tensor([float(x) for x in xs], dtype=torch.float64, device=device)
    totals = all_sum(torch.cat([f64([
        len(batch), sum(b["outcome"] for b in breakdown), sum(c is True for c in correct),
        sum(b["confidence_bonus"] for b in breakdown), sum(b["n_computed"] for b in breakdown),
        sum(b["n_correct"] for b in breakdown),
        g.finished.sum(), mask.sum()]),
        torch.stack([(logged_rewards * mask).sum(), (kl * mask).sum(), (kl_penalty(old_logp, ref_logp, "k3") * mask).sum(),
                     torch.where(mask.bool(), g.entropies, 0.0).sum(),
                     torch.where(mask.bool(), (g.logprobs - old_logp).abs(), 0.0).sum()]).double()]))
    rows, outcome, right, bonus, computed, computed_right, eos, n_tok, rew, kl_sum, k3, ent, gap = totals.tolist()

    kl_seq = kl_sum / rows
    ctx["kl"].update(kl_seq, int(rows))

    # 8. Metrics (glossary in README.md).
    mean = lambda key: sum(s[key] for s in stats) / len(stats)
    row = {
        "step": step + 1,
        "score": outcome / rows,
        "accuracy": right / rows,
        "confidence_bonus": bonus / rows,
        "computed_per_response": computed / rows,
        "computed_correct_frac": computed_right / max(1.0, computed),
        "reward": rew / rows,
        "kl": kl_seq,
        "kl_k3": k3 / rows,
        "kl_coef": kl_coef,
        "entropy": ent / max(1.0, n_tok),
        "gen_logprob_gap": gap / max(1.0, n_tok),
        "approx_kl": mean("approx_kl"), "clipfrac": mean("clipfrac"), "ratio": mean("ratio"),
        "ratio_var": mean("ratio_var"), "first_ratio": first["ratio"], "first_approx_kl": first["approx_kl"],
        "policy_loss": mean("policy_loss"), "grad_norm": mean("grad_norm"),
        "response_len": n_tok / rows, "eos_frac": eos / rows,
        "rollout_s": t_rollout, "update_s": t_update, "tok_per_s": n_tok / max(t_rollout, 1e-9),
        "minibatches": len(stats),
    }
    if returns is not None:
        row.update(value_loss=mean("value_loss"), value_clipfrac=mean("value_clipfrac"),
                   explained_variance=float(explained_variance(old_values, returns, mask, reduce)))
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
    check_out_dir(out, cfg.resume, cfg.overwrite)
    for flag, d in [("--init", cfg.init)] + ([("--value-init", cfg.value_init)] if cfg.value_init else []):
        if not (Path(d) / "config.json").exists():
            raise PPOError(f"{flag} {d}: not a checkpoint directory (no config.json)")
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


def save_critic(critic: ValueModel, d: Path, state: Optional[dict] = None):
    """value_head.safetensors, and critic/ (HF layout) for a separate critic. state: the critic's
    weights to write instead of its own (gathered from FSDP shards), keys as critic.state_dict()'s."""
    from safetensors.torch import save_file
    state = critic.state_dict() if state is None else state
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, str(d / "value_head.safetensors"))
    if critic.trunk is not None:
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        critic.trunk.save_pretrained(d / "critic", state_dict=trunk)


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
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    fsdp = cfg.fsdp and world > 1
    tok, policy, ref, critic, problems, eval_problems = setup(cfg)
    out = Path(cfg.out)
    policy.to(device), ref.to(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device == "cuda")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16)
    n_params = policy.num_params()
    # Many ranks: the policy and critic are trained through DDP / FSDP wrappers; under FSDP the frozen
    # reference is sharded too (forward only). Rollouts and no-grad scoring call the modules directly.
    train_policy = wrap_for_training(policy, device, cfg.fsdp, use_bf16)
    if fsdp:
        wrap_for_training(ref, device, True, use_bf16)
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr}]
    train_critic = None
    if critic is not None:
        critic.to(device)
        train_critic = wrap_for_training(critic, device, cfg.fsdp, use_bf16)
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic_lr})
    # Adam eps 1e-5 as in cleanrl / LHP; no weight decay: the KL penalty is the regulariser here.
    opt = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
    # policy and critic under one parent, for one name-keyed (gathered) state of weights and optimizer
    trained = nn.ModuleDict({"policy": policy, **({"critic": critic} if critic is not None else {})})
    kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0 else FixedKLController(cfg.kl_coef)
    if eval_problems and fsdp:
        say("--fsdp: answer accuracy during training is skipped (sharded decoding); run eval.py on the checkpoint")
        eval_problems = []
    step, wall = 0, 0.0
    if cfg.resume:
        st = torch.load(out / "train_state.pt", weights_only=True)
        load_optimizer_state(trained, opt, st["optimizer"])
        step, wall, kl.value = st["step"], st["wall_time_s"], st["kl_coef"]
        if main:
            trim_metrics(out, step)
        say(f"resumed {out} at update {step}")
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    params = [p for g_ in groups for p in g_["params"]]
    ctx = dict(policy=policy, ref=ref, critic=critic, train_policy=train_policy, train_critic=train_critic, tok=tok,
               opt=opt, device=device, autocast=autocast, problems=problems, kl=kl, params=params, rank=rank,
               world=world, fsdp=fsdp)
    say(f"policy {n_params / 1e6:.2f}M params from {cfg.init} | {len(problems)} problems | "
        f"reward {cfg.reward} | advantage {cfg.advantage} | {cfg.steps} updates x "
        f"{cfg.prompts_per_step * cfg.samples_per_prompt * world} responses | device {device}{' bf16' if use_bf16 else ''}"
        f"{f' | {world} ranks, ' + ('FSDP' if fsdp else 'DDP') if world > 1 else ''}")
    say(json.dumps(asdict(cfg)))

    def save():
        weights, optim = training_state(trained, opt)  # every rank takes part; rank 0 gets the full state
        if main:
            buf = io.BytesIO()
            torch.save({"optimizer": optim, "step": step, "wall_time_s": wall, "kl_coef": kl.value}, buf)
            part = lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

            def extra(tmp: Path):
                tok.save(tmp)
                (tmp / "train_state.pt").write_bytes(buf.getvalue())
                (tmp / "ppo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
                if critic is not None:
                    save_critic(critic, tmp, part("critic."))

            policy.save_pretrained(out, dtype=torch.float32, extra=extra, state_dict=part("policy."))
        if world > 1:
            dist.barrier()

    bar = tqdm(total=cfg.steps, initial=step, desc="ppo", dynamic_ncols=True, disable=None if main else True)
    while step < cfg.steps:
        t0 = time.time()
        row = ppo_step(step, cfg, ctx)
        step += 1
        wall += time.time() - t0
        row["wall_time_s"] = wall
        bar.update(1)
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            bar.write(f"update {step}/{cfg.steps} score {row['score']:.3f} acc {row['accuracy']:.3f} "
                      f"kl {row['kl']:.3f} ent {row['entropy']:.3f} approx_kl {row['approx_kl']:.4f} "
                      f"clipfrac {row['clipfrac']:.3f} len {row['response_len']:.0f} eos {row['eos_frac']:.2f} "
                      f"tok/s {row['tok_per_s']:,.0f}")
        if main and cfg.sample_every and step % cfg.sample_every == 0:
            for q, text, ok, b in ctx["samples"][:2]:
                bar.write(f"  Q: {q}\n  A: {text!r}\n  correct={ok} outcome={b['outcome']} bonus={b['confidence_bonus']:.3f}")
        if eval_problems and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            from eval import evaluate
            mine = eval_problems[rank::world]  # each rank decodes its share
            res = evaluate(policy.eval(), tok, mine, batch_size=64, max_new_tokens=cfg.max_new_tokens,
                           progress=False) if mine else None
            right = all_sum(torch.tensor([res["accuracy"] * len(mine) if res else 0.0], dtype=torch.float64, device=device))
            row["eval_accuracy"] = round(float(right[0])) / len(eval_problems)
            if main:
                bar.write(f"  eval accuracy {row['eval_accuracy']:.4f} on {len(eval_problems)} problems")
        if main:
            append_metrics(out, row)
        if (cfg.save_every and step % cfg.save_every == 0) or step in (cfg.steps, cfg.stop_at):
            save()
        if step == cfg.stop_at:
            break
    bar.close()
    say(f"done: {step} updates in {wall:.1f}s; checkpoint in {out}")


def parse_args(argv=None) -> PPOConfig:
    return parse_config(PPOConfig, __doc__, argv)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
