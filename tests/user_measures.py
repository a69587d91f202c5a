"""User-defined measures for the tests (a sweep config names them as "user_measures:NAME")."""

from __future__ import annotations

import math

import torch


def weight_norm(subject) -> float:
    """Σ ‖θ^F‖² over floating-point entries of the final state."""
    return float(sum(v.double().square().sum() for v in subject.final.values()
                     if v.is_floating_point()))


def allocates(subject) -> float:
    """Holds 512 MiB (every page written) while it computes: its phase's peak memory shows it."""
    block = torch.ones(512 * 2**20 // 8, dtype=torch.float64)
    return float(block[:10].sum())


def raises(subject) -> float:
    raise ValueError("this measure always fails")


def nan(subject) -> float:
    return math.nan


def tensor(subject):
    return torch.tensor(1.0)


def text(subject):
    return "1.0"


NOT_A_FUNCTION = 3
