"""What a chat model writes for held-out prompts: does it answer in the template and stop with ``<|end|>``?

``reply_stats(model, tokenizer, conversations, template)`` renders each conversation without its
final reply as a generation prompt (``llm.post.chat.render(..., add_generation_prompt=True)``, the
prompt cut from the left to leave room for the reply), decodes greedily with ``<|end|>`` as the end
token, reads each reply back (``parse_reply``) and counts:

- ``stop``: the reply ended with ``<|end|>`` within ``max_new_tokens``;
- ``in_template``: it wrote no turn or conversation marker (``<|user|>``, ``<|assistant|>``,
  ``<|system|>``, ``<|endoftext|>``, ``<|pad|>``; in the alpaca template also "### Instruction:" /
  "### Response:") before its end;
- ``exact``: its text is the reference reply (whitespace at the ends ignored).
"""

from __future__ import annotations

import numpy as np

from ..generate import generate
from .chat import chat_tokens, parse_reply, render, truncate


def generation_prompt(tokenizer, conversation, template: str, max_len: int) -> list:
    """The ids to generate the final reply of ``conversation`` from, at most ``max_len`` (cut from the left)."""
    prompt = render(tokenizer, conversation[:-1], template=template, add_generation_prompt=True)
    fitted, _, _ = truncate(prompt, max(max_len, 2))
    return fitted.ids


def generate_replies(model, tokenizer, conversations, template: str, max_new_tokens: int = 32,
                     batch_size: int = 16) -> list:
    """Greedy replies (``llm.post.chat.Reply``) to the final user turn of each conversation."""
    eos = chat_tokens(tokenizer).eos
    room = model.config.block_size - max_new_tokens
    prompts = [np.asarray(generation_prompt(tokenizer, c, template, room)) for c in conversations]
    replies = []
    for i in range(0, len(prompts), batch_size):
        new = generate(model, prompts[i:i + batch_size], max_new_tokens, greedy=True, eos_id=eos)
        replies += [parse_reply(tokenizer, row, template) for row in new]
    return replies


def reply_stats(model, tokenizer, conversations, template: str, max_new_tokens: int = 32) -> dict:
    """``{"replies_stop", "replies_in_template", "replies_exact"}``: fractions over ``conversations`` (see the
    module docstring), and ``"replies_n"``."""
    if not conversations:
        return {}
    replies = generate_replies(model, tokenizer, conversations, template, max_new_tokens)
    n = len(replies)
    exact = sum(r.text.strip() == c[-1]["content"].strip() for r, c in zip(replies, conversations))
    return {"replies_stop": sum(r.stopped for r in replies) / n,
            "replies_in_template": sum(r.in_template for r in replies) / n,
            "replies_exact": exact / n, "replies_n": n}


__all__ = ["generation_prompt", "generate_replies", "reply_stats"]
