"""Evaluation measures that need the models themselves (the judge and reward scores live elsewhere).

policy_kl: how far a policy has moved from its reference (the SFT model) on the policy's own replies:
per reply, the sum over its tokens of the exact KL between the two next-token distributions at that
position, KL(pi(.|x, y_<t) || ref(.|x, y_<t)) summed over the whole vocabulary. It is never negative
and needs no sampling, which matters because evaluate decodes greedily: the one-sample estimate
log pi(y) - log ref(y) is unbiased only for y sampled from pi, and on greedy replies it came out
negative (-0.72 nats per reply for DPO on the make-run home of 2026-12-06: DPO lowers the likelihood of
its own most likely reply below what SFT gives it, which says nothing about the distance between them).
Log-probabilities are taken at temperature 1, i.e. of the models themselves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def policy_kl(policy_dir: Path, reference_dir: Path, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 8) -> list[float]:
    """Per sample: sum over the response positions of KL(policy || reference) of the next-token
    distributions (nats, >= 0); 0.0 for an empty response.

    Prompts are used exactly as given (already formatted for the model); prompt and response are
    tokenized separately and concatenated, so the response tokens are the same for both models.
    Both dirs must share one tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir, reference_dir = Path(policy_dir), Path(reference_dir)
    for name, path in (("policy_dir", policy_dir), ("reference_dir", reference_dir)):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"policy_kl: {name} {path}/config.json not found (not a model dir)")
    if len(prompts) != len(responses):
        raise ValueError(f"policy_kl: {len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"policy_kl: invalid batch_size={batch_size!r}")
    if not prompts:
        return []

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    reference_tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ValueError(f"policy_kl: {policy_dir} and {reference_dir} have different tokenizers; "
                         "log-probabilities of the same tokens cannot be compared")

    # (prompt ids, response ids) per sample; logits at position i predict token i + 1
    pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"])
             for p, r in zip(prompts, responses)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # float32 on purpose: the measure is a small difference of two large sums of log-probabilities
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).to(device).eval()

    def response_log_softmax(model, input_ids, attention_mask, positions) -> torch.Tensor:
        """log-probabilities over the vocabulary at the masked positions: (positions, vocab)."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return logits[positions].float().log_softmax(-1)

    kls: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        response_mask = torch.zeros((len(batch), width), dtype=torch.float32)
        for row, (prompt_ids, response_ids) in enumerate(batch):  # right padding: positions start at 0 for all
            ids = prompt_ids + response_ids
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
            # the first prompt token has no prediction; a response token at position 0 (empty prompt) is skipped
            response_mask[row, max(len(prompt_ids), 1):len(ids)] = 1.0
        input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
        positions = response_mask[:, 1:].bool()   # logits at position i predict token i + 1
        with torch.no_grad():
            log_policy = response_log_softmax(policy, input_ids, attention_mask, positions)
            log_reference = response_log_softmax(reference, input_ids, attention_mask, positions)
            per_token = torch.zeros(positions.shape, dtype=torch.float32, device=device)
            per_token[positions] = (log_policy.exp() * (log_policy - log_reference)).sum(-1)
        kls.extend(float(v) for v in per_token.sum(-1).cpu())
    return kls
