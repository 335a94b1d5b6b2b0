"""The demo's verifiable task: fixed-width addition, generated from a seed.

A prompt is ``BOS a₁…a_d + b₁…b_d =`` (zero-padded), the answer the d+1 digits of a+b
(zero-padded, most significant first) followed by EOS. The reward is 1 for an exactly
correct answer, else 0 — a verifier, as in RL with verifiable rewards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PLUS, EQ, BOS, EOS = 10, 11, 12, 13


@dataclass
class Problems:
    prompts: Tensor  # (N, 2d+3) int64
    answers: Tensor  # (N, d+2) int64: the digits of the sum, then EOS


def _digits(x: Tensor, width: int) -> Tensor:
    p = 10 ** torch.arange(width - 1, -1, -1)
    return (x[:, None] // p) % 10


def split_problems(digits: int, n_train: int, n_val: int, n_test: int, seed: int):
    """Disjoint train, validation and test sets of distinct problems (no test problem is
    ever trained on)."""
    n = n_train + n_val + n_test
    if not 1 <= digits <= 3:
        raise ValueError(f"digits must be 1, 2 or 3, got {digits}")
    if n > 100 ** digits:
        raise ValueError(f"{digits}-digit addition has only {100 ** digits} distinct problems, {n} requested")
    g = torch.Generator().manual_seed(seed)
    hi = 10 ** digits
    pairs = torch.randperm(100 ** digits, generator=g)[:n]
    a, b = pairs // hi, pairs % hi
    col = lambda v: torch.full((n, 1), v, dtype=torch.long)
    prompts = torch.cat([col(BOS), _digits(a, digits), col(PLUS), _digits(b, digits), col(EQ)], 1)
    answers = torch.cat([_digits(a + b, digits + 1), col(EOS)], 1)
    cuts = [0, n_train, n_train + n_val, n]
    return tuple(Problems(prompts[i:j], answers[i:j]) for i, j in zip(cuts, cuts[1:]))


def reward(completions: Tensor, answers: Tensor) -> Tensor:
    """1.0 where the completion equals the answer (digits then EOS), else 0.0."""
    return (completions == answers).all(dim=1).float()


@torch.no_grad()
def generate(model, prompts: Tensor, length: int, *, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> Tensor:
    """``length`` tokens after each prompt: greedy (temperature 0) or sampled."""
    ids = prompts
    for _ in range(length):
        logits = model(ids)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, prompts.shape[1]:]


@torch.no_grad()
def accuracy(model, problems: Problems, batch: int = 1024) -> float:
    """Greedy exact-match accuracy."""
    was = model.training
    model.eval()
    hits = 0.0
    for i in range(0, len(problems.prompts), batch):
        p, a = problems.prompts[i:i + batch], problems.answers[i:i + batch]
        hits += float(reward(generate(model, p, a.shape[1]), a).sum())
    model.train(was)
    return hits / len(problems.prompts)
