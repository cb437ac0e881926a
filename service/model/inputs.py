"""The generator's input batch, read by the generator and its ridge path; `model.item_inputs` builds one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ItemInputs:
    """A batch of items as the generator sees them; missing modalities are flagged, not zero-filled."""

    attributes: torch.Tensor  # (B, A) long, vocabulary index + 1, 0 = padding
    content: torch.Tensor  # (B, F) float; ignored where has_content is false
    has_attributes: torch.Tensor  # (B,) bool
    has_content: torch.Tensor  # (B,) bool
