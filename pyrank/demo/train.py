"""The demo's training: supervised warm-up, then RL with a verifiable reward (docs/METHODS.md §5).

GRPO: per prompt, ``group`` completions are sampled from the current policy and scored
by the verifier; each completion's advantage is its reward minus the group's mean,
divided by the group's standard deviation (0 for a group whose rewards are all equal);
the loss is PPO's clipped surrogate, averaged over each completion's tokens up to and
including its first EOS, then over completions. No KL penalty (as in DAPO).

HPT (Lv et al.): per prompt, if the group's mean reward P ≤ γ, the prompt contributes the
SFT loss on its reference answer instead of the RL loss — (α, β) = (0, 1), else (1, 0).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .task import EOS, Problems, generate, reward


def _answer_logprobs(model, prompts: Tensor, completions: Tensor) -> Tensor:
    """log π(completion token | prefix), shape (N, L)."""
    seq = torch.cat([prompts, completions], 1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1:].float()
    return torch.log_softmax(logits, -1).gather(-1, completions[:, :, None])[:, :, 0]


def _until_eos(completions: Tensor) -> Tensor:
    """Mask of the tokens up to and including the first EOS (all tokens if none)."""
    is_eos = (completions == EOS).long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before this position
    return (before == 0).float()


def sft_loss(model, prompts: Tensor, answers: Tensor) -> Tensor:
    """Mean token cross-entropy of the reference answers."""
    return -_answer_logprobs(model, prompts, answers).mean()


def supervised(model, data: Problems, *, steps: int, batch: int, lr: float, generator: torch.Generator,
               log: Optional[Callable[[int, float], None]] = None) -> None:
    """Plain SFT with AdamW on random minibatches of ``data``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for s in range(steps):
        idx = torch.randint(0, len(data.prompts), (batch,), generator=generator)
        loss = sft_loss(model, data.prompts[idx], data.answers[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log:
            log(s + 1, float(loss))


def rl(model, data: Problems, *, steps: int, prompts_per_step: int, group: int, lr: float,
       generator: torch.Generator, algo: str = "grpo", gamma: float = 0.0, clip: float = 0.2,
       temperature: float = 1.0, on_step: Optional[Callable[[int, dict], None]] = None) -> None:
    """GRPO (``algo="grpo"``) or HPT (``algo="hpt"``, threshold ``gamma``) for ``steps`` steps.

    ``on_step(step, stats)`` is called after every update with the step's mean reward,
    the fraction of prompts that took the SFT branch (HPT) and the loss.
    """
    if algo not in ("grpo", "hpt"):
        raise ValueError(f"algo must be 'grpo' or 'hpt', got {algo!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    L = data.answers.shape[1]
    for s in range(steps):
        idx = torch.randint(0, len(data.prompts), (prompts_per_step,), generator=generator)
        prompts, answers = data.prompts[idx], data.answers[idx]
        rep_prompts = prompts.repeat_interleave(group, 0)
        model.eval()
        comp = generate(model, rep_prompts, L, temperature=temperature, generator=generator)
        r = reward(comp, answers.repeat_interleave(group, 0)).view(prompts_per_step, group)
        mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
        adv = torch.where(std > 0, (r - mean) / (std + 1e-6), torch.zeros_like(r)).view(-1)
        sft_rows = (mean[:, 0] <= gamma) if algo == "hpt" else torch.zeros(prompts_per_step, dtype=torch.bool)
        model.train()
        mask = _until_eos(comp)
        with torch.no_grad():
            old = _answer_logprobs(model, rep_prompts, comp)
        new = _answer_logprobs(model, rep_prompts, comp)
        ratio = torch.exp(new - old)
        surr = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - clip, 1 + clip) * adv[:, None])
        per_completion = -(surr * mask).sum(1) / mask.sum(1)
        rl_rows = (~sft_rows).repeat_interleave(group)
        terms = [per_completion[rl_rows].sum() / group] if bool(rl_rows.any()) else []
        if bool(sft_rows.any()):
            ce = -_answer_logprobs(model, prompts[sft_rows], answers[sft_rows]).mean(1)
            terms.append(ce.sum())
        loss = sum(terms) / prompts_per_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(s + 1, {"reward": float(r.mean()), "sft_fraction": float(sft_rows.float().mean()),
                            "loss": float(loss.detach())})
