"""ppo.py's command line with the sampler replaced by fixed responses, so one process and N processes
can be fed the same rollouts (tests/test_distributed.py). Every update's whitened advantages are saved
per rank in $ADV_DIR as adv_<step>_<rank>.pt.

    python tests/ppo_fixed_rollouts.py PPO_FLAGS...
    torchrun --nproc_per_node 2 tests/ppo_fixed_rollouts.py PPO_FLAGS...
"""
import os
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo  # noqa: E402
from data import prompt_text  # noqa: E402
from model import Generation, left_pad  # noqa: E402


def fixed_rollout(policy, tok, batch, cfg, step, rank=0, across_ranks=False):
    """A response that depends only on the problem and the update: right or off by one, of varying
    length, every fifth one cut off before its EOS; entropies drawn from a generator seeded the same way."""
    device = policy.lm_head.weight.device
    prompts = [tok.render(prompt_text(p))[0] for p in batch]
    rows, ents, finished = [], [], []
    for p in batch:
        h = zlib.crc32(f"{p['id']}/{step}".encode())
        answer = int(p["answer"]) + (h % 2)
        text = f"{'so ' * (h % 4)}x = {p['answer']}.\nThe answer is {answer}."
        ids = tok.encode(text) + [tok.eos_id]
        if h % 5 == 0:
            ids = ids[:-1]
        rows.append(ids)
        ents.append(torch.rand(len(ids), generator=torch.Generator().manual_seed(h)))
        finished.append(h % 5 != 0)
    N = max(map(len, rows))
    tokens = torch.full((len(batch), N), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), N, dtype=torch.long)
    entropies = torch.zeros(len(batch), N)
    for b, (ids, e) in enumerate(zip(rows, ents)):
        tokens[b, :len(ids)], mask[b, :len(ids)], entropies[b, :len(ids)] = torch.tensor(ids), 1, e
    p_ids, p_mask = left_pad(prompts, tok.pad_id, device)
    g = Generation(tokens.to(device), torch.zeros(len(batch), N, device=device), entropies.to(device),
                   mask.to(device), torch.tensor(finished, device=device))
    return p_ids, p_mask, g


def ppo_step_saving_advantages(step, cfg, ctx):
    row = real_step(step, cfg, ctx)
    torch.save(ctx["advantages"].cpu(), Path(os.environ["ADV_DIR"]) / f"adv_{step}_{ctx['rank']}.pt")
    return row


real_step = ppo.ppo_step
ppo.rollout = fixed_rollout
ppo.ppo_step = ppo_step_saving_advantages

if __name__ == "__main__":
    ppo.main(sys.argv[1:])
