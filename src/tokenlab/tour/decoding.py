"""Tour section of the decoding family: speculative decoding on the toy target/draft pair."""

from __future__ import annotations

import torch

from tokenlab.decoding.speculative import speculative_generate
from tokenlab.testing.timing import timed
from tokenlab.tour.toy import ToyWorld


def tour_section(world: ToyWorld) -> list[str]:
    """Greedy speculative decoding (chain and batched EQSPEC/EXSPEC) vs plain ``generate`` on the
    toy pair: acceptance rate, tokens per target call, tokens/s and speedup (device labelled)."""
    target, draft, device = world.target, world.draft, world.target.device
    label = "GPU" if device.type == "cuda" else "CPU"
    n_prompts, prompt_len, max_new, k = 4, 16, 20, 4
    # Prompts spread over the held-out corpus (its first document starts with a licence header).
    starts = torch.linspace(0, world.heldout_ids.numel() - prompt_len, n_prompts + 2).long()[1:-1]
    ids = torch.stack([world.heldout_ids[s : s + prompt_len] for s in starts.tolist()]).to(device)
    pad = world.tokenizer.pad_token_id

    def clock(fn):
        return timed(fn, device)

    greedy = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
    target.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    plain, plain_s = clock(lambda: [target.generate(ids[i : i + 1], **greedy) for i in range(n_prompts)])
    plain_tps = sum(int((p[0, prompt_len:] != pad).sum()) for p in plain) / plain_s
    chain, chain_s = clock(
        lambda: [
            speculative_generate(target, draft, ids[i : i + 1], num_draft_tokens=k, **greedy)
            for i in range(n_prompts)
        ]
    )
    same = all(torch.equal(c.sequences, p) for c, p in zip(chain, plain))
    accepted = sum(c.stats.accepted for c in chain) / sum(c.stats.drafted for c in chain)
    per_call = sum(c.stats.accepted + c.stats.steps for c in chain) / sum(c.stats.steps for c in chain)
    chain_tps = sum(c.stats.new_tokens for c in chain) / chain_s
    lines = [
        f"{n_prompts} held-out prompts × {max_new} greedy tokens, k={k} draft tokens, {label} timings",
        f"plain target.generate: {plain_tps:.0f} tokens/s",
        f"chain: acceptance {accepted:.2f}, {per_call:.2f} tokens per target call, {chain_tps:.0f} tokens/s "
        f"({chain_tps / plain_tps:.2f}× plain, {label}); identical to generate: {'yes' if same else 'NO'}",
    ]
    expected = torch.cat(plain)
    for strategy in ("eqspec", "exspec"):
        out = speculative_generate(target, draft, ids, num_draft_tokens=k, strategy=strategy, **greedy)
        tps = out.stats.tokens_per_second
        lines.append(
            f"batched {strategy.upper()} B={n_prompts}: {tps:.0f} tokens/s ({tps / plain_tps:.2f}× plain, "
            f"{label}); identical to generate: {'yes' if torch.equal(out.sequences, expected) else 'NO'}"
        )
    return lines
