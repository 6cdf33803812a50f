"""Tiny random-weight Hugging Face transformers, built from configs (no hub access).

Every model is wrapped so that ``forward`` takes plain tensors (``input_ids``,
``attention_mask``) and returns a single tensor: exporters then see a flat signature
and the ONNX graph has one output.  Eager attention is used (explicit
MatMul / Softmax in the graph rather than an SDPA kernel).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn

TINY = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=100, max_pos=64)


class _HFWrapper(nn.Module):
    """Calls a HF model with keyword tensors and returns one tensor field of its output."""

    def __init__(self, model: nn.Module, field: str, **extra):
        super().__init__()
        self.model = model
        self.field = field
        self.extra = extra  # e.g. use_cache=False for the causal LMs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra)
        return getattr(out, self.field)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    c = BertConfig(
        vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"], intermediate_size=TINY["intermediate"],
        max_position_embeddings=TINY["max_pos"], num_labels=3, attn_implementation="eager",
    )
    return _HFWrapper(BertForSequenceClassification(c), "logits").eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = GPT2Config(
        vocab_size=TINY["vocab"], n_embd=TINY["hidden"], n_layer=TINY["layers"], n_head=TINY["heads"],
        n_inner=TINY["intermediate"], n_positions=TINY["max_pos"], tie_word_embeddings=True,
        bos_token_id=TINY["vocab"] - 1, eos_token_id=TINY["vocab"] - 1,
        use_cache=False, attn_implementation="eager",
    )
    m = GPT2LMHeadModel(c)
    assert m.lm_head.weight is m.transformer.wte.weight  # tied embeddings
    return _HFWrapper(m, "logits", use_cache=False).eval()


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"], num_key_value_heads=2,  # GQA
        max_position_embeddings=TINY["max_pos"], use_cache=False, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return _HFWrapper(LlamaForCausalLM(c), "logits", use_cache=False).eval()


def t5_encoder() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    c = T5Config(
        vocab_size=TINY["vocab"], d_model=TINY["hidden"], d_kv=TINY["hidden"] // TINY["heads"],
        d_ff=TINY["intermediate"], num_layers=TINY["layers"], num_heads=TINY["heads"],
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / flan-T5 gated FFN (wi_0, wi_1)
        use_cache=False, is_encoder_decoder=False, attn_implementation="eager",
    )
    return _HFWrapper(T5EncoderModel(c), "last_hidden_state").eval()
