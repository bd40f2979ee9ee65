"""Tiny text encoders and tokenizers for the stand-in pipelines, built in memory (no files, no downloads).

Real pipelines encode prompts with CLIP and T5-family models; these have the same classes and call conventions
at toy width, so a stand-in accepts ``prompt="..."`` exactly as the real pipeline does. Weights are random: the
prompt changes the output, deterministically, but means nothing.
"""

from __future__ import annotations

import string
from typing import Optional

__all__ = ["tiny_clip_text_encoder", "tiny_t5_encoder", "tiny_t5_tokenizer"]

# The vocabulary size of the tiny encoders: larger than any tiny tokenizer's id.
_VOCAB = 1000


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5Tokenizer (sentencepiece-style unigram) over single characters and word-initial letters, built in
    memory: any ASCII text tokenizes, anything else maps to ``<unk>``. Ids ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -1.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -1.5) for c in string.ascii_letters + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(d_model: int = 32, umt5: bool = False):
    """A one-layer T5EncoderModel (UMT5EncoderModel with ``umt5``) with hidden size ``d_model``, in eval mode."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=_VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config).eval()


def tiny_clip_text_encoder(hidden_size: int = 32, projection_dim: Optional[int] = None):
    """A two-layer CLIPTextModel (CLIPTextModelWithProjection with ``projection_dim``) for the byte-level
    :func:`~kds_hook.testing.tiny_clip_tokenizer` (77 positions, its special tokens' ids), in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=projection_dim or hidden_size,
    )
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_class(config).eval()
