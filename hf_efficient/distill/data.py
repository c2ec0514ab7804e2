"""Self-generated training data: the float model continues prompts cut from the training plays.

BitDistiller trains the quantized student on text its own float teacher writes (temperature 0.7), so the
student learns the teacher's distribution rather than the corpus's. The result is a ``datasets.Dataset``
(columns ``input_ids``, ``prompt_len``, ``text``) that :meth:`datasets.Dataset.save_to_disk` keeps, so every
arm of a comparison trains on the same tokens.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def prompts_from_plays(tokenizer, n: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``(n, prompt_len)`` token windows sampled from the training plays (never the held-out ones)."""
    from ..data import sample_windows, token_ids

    pool = token_ids(tokenizer, "train", max(8 * n * prompt_len, 50_000))
    return sample_windows(pool, n, prompt_len, seed)


@torch.no_grad()
def generate_training_data(model, tokenizer, n_samples: int = 256, prompt_len: int = 32, gen_len: int = 224,
                           temperature: float = 0.7, batch_size: int = 16, prompts: list[str] | None = None,
                           seed: int = 0, progress: bool = True):
    """Generate ``n_samples`` sequences of ``prompt_len + gen_len`` tokens with ``model`` (sampling at
    ``temperature``) and return them as a ``datasets.Dataset``.

    ``prompts``: extra user prompts (strings), used first and cut/left-aligned to ``prompt_len`` tokens;
    the rest are windows of the training plays. Generation runs until ``gen_len`` new tokens for every row
    (end-of-sequence is suppressed: each row holds exactly ``gen_len`` sampled tokens).
    Deterministic in ``seed`` on a given device.
    """
    import datasets
    from tqdm.auto import tqdm

    for name, v in (("n_samples", n_samples), ("prompt_len", prompt_len), ("gen_len", gen_len),
                    ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"generate_training_data: {name}={v!r} must be a positive int")
    if not temperature > 0:
        raise ValueError(f"generate_training_data: temperature={temperature!r} must be > 0")
    user = []
    for p in prompts or []:
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids[0][-prompt_len:]
        if ids.numel() < prompt_len:
            pad = prompts_from_plays(tokenizer, 1, prompt_len - ids.numel(), seed + 1 + len(user))[0]
            ids = torch.cat([pad, ids])  # prefix with play text: every prompt has the same length, no padding
        user.append(ids)
    n_plays = max(0, n_samples - len(user))
    plays = prompts_from_plays(tokenizer, n_plays, prompt_len, seed) if n_plays else torch.empty(0, prompt_len)
    all_prompts = plays.long()
    if user:
        all_prompts = torch.cat([torch.stack(user).long(), plays.long()])[:n_samples]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    # generate() samples from the global RNG: seed it inside a fork so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for start in tqdm(range(0, len(all_prompts), batch_size), desc="generating", disable=not progress):
                ids = all_prompts[start: start + batch_size].to(device)
                # min = max new tokens: end-of-sequence is suppressed, every row has exactly gen_len tokens.
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0, min_new_tokens=gen_len,
                                     max_new_tokens=gen_len, pad_token_id=tokenizer.eos_token_id)
                rows += out.cpu().tolist()
        finally:
            model.train(was_training)
    return datasets.Dataset.from_dict({
        "input_ids": rows,
        "prompt_len": [prompt_len] * len(rows),
        "text": tokenizer.batch_decode([r[prompt_len:] for r in rows], skip_special_tokens=True),
    })

