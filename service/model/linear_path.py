"""The generator's linear path: a ridge map from an item's features to its row [v; b] (D+1).

Features are the normalised content vector c/‖c‖ and the attribute multi-hot scaled to length w
(each of the item's n known tokens weighs w/√n), the same blocks as the ridge-mf baseline. The map
is not learned by gradient: the trainer solves it in closed form (training/linear_fit.py) onto the
current warm rows of V, and this module only applies it.

A missing modality is not a zero feature block read by the full map (the joint map's coefficients
are partial effects given the other block, so dropping a block biases the row): each availability
pattern has its own map, fitted on the warm items with only those blocks — the best linear
prediction from what the item actually has. Patterns: 0 nothing (the mean row), 1 attributes only,
2 content only, 3 both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.model.config import ModelConfig
from service.model.inputs import ItemInputs

NOTHING, ATTRIBUTES, CONTENT, BOTH = 0, 1, 2, 3


class LinearPath(nn.Module):
    content_map: torch.Tensor  # (2, F, D+1): [content only, both]
    attribute_map: torch.Tensor  # (2, A+1, D+1): [attributes only, both]; row 0 (padding) stays 0
    intercept: torch.Tensor  # (4, D+1), one per pattern

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out = cfg.item_dim + 1
        self.attribute_weight = cfg.linear_attribute_weight
        self.has_content_input = cfg.content_dim > 0
        self.register_buffer("content_map", torch.zeros(2, max(cfg.content_dim, 1), out))
        self.register_buffer("attribute_map", torch.zeros(2, cfg.n_attributes + 1, out))
        self.register_buffer("intercept", torch.zeros(4, out))

    def token_weights(self, attributes: torch.Tensor) -> torch.Tensor:
        """(B, A) weight of each attribute slot: w/√n for the item's n tokens, 0 for padding."""
        real = attributes > 0
        n = real.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        return real.to(torch.float32) * (self.attribute_weight / n.sqrt())

    def patterns(self, x: ItemInputs) -> torch.Tensor:
        """(B,) long availability pattern: 1·has attributes + 2·has content."""
        has_a = x.has_attributes & (x.attributes > 0).any(dim=1)
        has_c = x.has_content & self.has_content_input
        return has_a.long() + 2 * has_c.long()

    def forward(self, x: ItemInputs) -> torch.Tensor:
        pattern = self.patterns(x)  # (B,)
        A1, out = self.attribute_map.shape[1], self.attribute_map.shape[2]
        table = self.attribute_map.permute(1, 0, 2).reshape(A1, 2 * out)  # (A+1, 2·(D+1))
        tokens = F.embedding(x.attributes, table) * self.token_weights(x.attributes)[:, :, None]
        a_only, a_both = tokens.sum(dim=1).view(-1, 2, out).unbind(dim=1)  # (B, D+1) each
        c = F.normalize(x.content, dim=1, eps=1e-8)  # (B, F)
        c_only, c_both = (c @ self.content_map).unbind(dim=0)  # (B, D+1) each
        zero = torch.zeros_like(a_only)
        rows = self.intercept[pattern]  # (B, D+1)
        rows = rows + torch.where((pattern == ATTRIBUTES)[:, None], a_only, zero)
        rows = rows + torch.where((pattern == CONTENT)[:, None], c_only, zero)
        both = (pattern == BOTH)[:, None]
        return rows + torch.where(both, a_both + c_both, zero)  # (B, D+1)
