"""Language-grounded object selection: which object of the environment state the instruction names.

Environment-state features named ``<object>.<field>`` (e.g. ``red_block.dx``) declare objects;
objects with the same fields are *candidates* for an instruction ("push the red block ...").
:class:`InstructedObject` grounds the instruction in the candidates' names with the frozen
sentence encoder, as CLIP matches text to image regions: the score of a candidate is the
cosine similarity of the instruction's embedding and the embedding of its name
(``red_block`` -> "red block"), divided by :data:`TEMPERATURE`, and a softmax over the
candidates weights their fields. The instructed object's fields then come in one fixed
layout: the same weights serve every candidate, so one skill is learned from all
demonstrations instead of one per object, and the candidates the demonstrator ignored
cannot become episode identifiers to memorize. Nothing of it is trained; learning the
pointer from the action loss instead was measured to pick wrong objects (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SEPARATOR = "."
#: Softmax temperature on cosine similarities. all-MiniLM-L6-v2 scores "push the red block to
#: the goal" 0.68 against "red block" and 0.45 against "green block": weight 0.99999 on red.
TEMPERATURE = 0.02


def candidate_objects(names: Sequence[str] | None) -> dict[str, list[int]]:
    """``{object: field indices}`` of the largest set (>= 2) of objects sharing their fields, else ``{}``.

    ``["red.x", "red.y", "red.yaw", "blue.x", "blue.y", "blue.yaw", "goal.x", "goal.y"]`` gives
    ``{"red": [0, 1, 2], "blue": [3, 4, 5]}``; names without ``.`` belong to no object.
    """
    objects: dict[str, list[tuple[str, int]]] = {}
    for i, name in enumerate(names or []):
        obj, sep, field = name.rpartition(SEPARATOR)
        if sep and obj and field:
            objects.setdefault(obj, []).append((field, i))
    kinds: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for obj, fields in objects.items():
        kinds.setdefault(tuple(f for f, _ in fields), {})[obj] = [i for _, i in fields]
    best = max(kinds.values(), key=len, default={})
    return best if len(best) >= 2 else {}


def object_phrase(name: str) -> str:
    """The text an object name is embedded as: ``red_block`` -> ``red block``."""
    return name.replace("_", " ").strip()


class InstructedObject(nn.Module):
    """Normalized environment state ``[B, To, D]`` + instruction embedding ``[B, E]`` -> ``[B, To, F + R]``.

    ``F`` fields of the instructed candidate, then the ``R`` features that belong to no
    candidate (e.g. the goal). The candidates' name embeddings are the buffer
    ``name_embeddings``, set once by :meth:`set_name_embeddings` (checkpoints keep them).
    """

    def __init__(self, candidates: dict[str, list[int]], dim: int, language_dim: int) -> None:
        super().__init__()
        self.names = list(candidates)
        in_candidates = {i for fields in candidates.values() for i in fields}
        self.register_buffer("fields", torch.tensor(list(candidates.values()), dtype=torch.long), persistent=False)
        self.register_buffer("rest", torch.tensor([i for i in range(dim) if i not in in_candidates], dtype=torch.long),
                             persistent=False)
        self.register_buffer("name_embeddings", torch.zeros(len(candidates), language_dim))
        self.out_dim = self.fields.shape[1] + len(self.rest)

    def set_name_embeddings(self, table: torch.Tensor) -> None:
        """Store the unit-norm sentence embeddings ``[objects, E]`` of the candidates' phrases."""
        self.name_embeddings.copy_(table)

    def weights(self, language: torch.Tensor) -> torch.Tensor:
        """``[B, objects]``: how much each candidate is the instructed one (``language``: unit-norm embeddings)."""
        return torch.softmax(language @ self.name_embeddings.T / TEMPERATURE, dim=-1)

    def forward(self, state: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        per_object = state[..., self.fields]  # [B, To, objects, F]
        selected = (self.weights(language)[:, None, :, None] * per_object).sum(dim=2)
        return torch.cat([selected, state[..., self.rest]], dim=-1)
