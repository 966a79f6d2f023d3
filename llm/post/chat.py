"""The chat format: its special tokens, two templates, and ``render``, the one way a conversation becomes ids.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``
(Hugging Face's "messages" format). ``render`` turns it into token ids and a loss mask that is 1
on the tokens the model must learn to write (each assistant reply and the end token after it)
and 0 elsewhere (the start token, system and user turns, the assistant header)::

    >>> tok, added = add_chat_tokens(tokenizer, model)          # once, for a pre-trained model
    >>> r = render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    >>> r.ids, r.mask, r.prompt_len

The two templates (``TEMPLATES``), shown as text; ``<|...|>`` are single special tokens and
``[...]`` marks the tokens whose mask is 1::

    chat     <|endoftext|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>[Hello!<|end|>]
    alpaca   <|endoftext|>Be brief.\\n\\n### Instruction:\\nHi\\n\\n### Response:\\n[Hello!<|end|>]

- BOS is ``<|endoftext|>``, the document separator pre-training already knows; EOS is ``<|end|>``,
  the end of every turn, where generation stops; PAD is ``<|pad|>`` (padding never gets a loss).
  The three are distinct ids.
- Every piece is encoded on its own (a special token by its id, text with ``encode_ordinary``), so
  the ids of a prompt are a prefix of the ids of the prompt and its answer, as training sees them,
  and text that looks like a special token (a user typing ``<|end|>``) stays ordinary text.
- ``render(..., add_generation_prompt=True)`` ends a conversation whose last turn is the user's
  with the assistant header: the prompt to generate from. ``parse_reply`` reads a generation back.
- A tokenizer without the chat tokens gets them with ``add_chat_tokens``, which also grows the
  model's embedding (``GPT.resize_token_embeddings``: new rows start at the mean embedding).

``truncate`` fits a rendered example into the context: the prompt is cut from the left (the
answer is kept), and only an answer longer than the context on its own is cut at its right end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import ENDOFTEXT

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
#: the special tokens the chat format adds to a tokenizer, in the order their ids are given
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN, PAD_TOKEN)
#: the start of every rendered conversation
BOS_TOKEN = ENDOFTEXT
ROLES = ("system", "user", "assistant")
TEMPLATES = ("chat", "alpaca")
#: the loss mask's choices: every assistant turn, or only the final one (DPO's completion)
LOSS_ON = ("assistant", "last")

# the text pieces of the alpaca template (its special tokens are BOS and END)
_ALPACA_INSTRUCTION = "### Instruction:\n"
_ALPACA_RESPONSE = "### Response:\n"
_ALPACA_SEP = "\n\n"
#: text that marks a new turn in the alpaca template (a reply that writes it has left the template)
ALPACA_MARKERS = ("### Instruction:", "### Response:")


class ChatFormatError(ValueError):
    """A conversation, a template or a tokenizer cannot be rendered; the message says what to change."""


@dataclass(frozen=True)
class ChatTokens:
    """The ids of the chat format's special tokens in one tokenizer (``chat_tokens``)."""

    bos: int
    eos: int
    pad: int
    system: int
    user: int
    assistant: int

    @property
    def role_markers(self) -> frozenset:
        """Ids that start a turn or a conversation: a reply that writes one has left the template."""
        return frozenset((self.bos, self.system, self.user, self.assistant, self.pad))


def chat_tokens(tokenizer) -> ChatTokens:
    """The chat token ids of ``tokenizer``; ``ChatFormatError`` naming the missing ones and the fix."""
    special = tokenizer.special_tokens
    missing = [t for t in (BOS_TOKEN,) + CHAT_TOKENS if t not in special]
    if missing:
        raise ChatFormatError(
            f"the tokenizer lacks the chat token(s) {', '.join(missing)}: add them to the tokenizer and the model "
            "with llm.post.chat.add_chat_tokens(tokenizer, model) (`python -m llm sft` does it for a pre-trained "
            "model; `python -m llm dpo` expects a model that went through SFT, or --add-chat-tokens)")
    return ChatTokens(bos=special[BOS_TOKEN], eos=special[END_TOKEN], pad=special[PAD_TOKEN],
                      system=special[SYSTEM_TOKEN], user=special[USER_TOKEN], assistant=special[ASSISTANT_TOKEN])


def add_chat_tokens(tokenizer, model=None):
    """``(tokenizer with the chat tokens, names added)``; ``model`` (a GPT) grows its embedding to match.

    Tokens already present keep their ids; the new ones get ids from
    ``tokenizer.n_vocab`` on (``Tokenizer.with_special_tokens``), and the model's
    new embedding rows (and untied head columns) start at the mean of the old
    ones (``GPT.resize_token_embeddings``). A tokenizer without ``<|endoftext|>``
    gets it too (it is the chat format's BOS).
    """
    wanted = (BOS_TOKEN,) + CHAT_TOKENS
    added = [t for t in wanted if t not in tokenizer.special_tokens]
    if model is not None and model.config.vocab_size != tokenizer.n_vocab:
        raise ChatFormatError(f"the model's vocabulary ({model.config.vocab_size} tokens) is not the tokenizer's "
                              f"({tokenizer.n_vocab}): they do not belong together")
    if not added:
        return tokenizer, []
    tokenizer = tokenizer.with_special_tokens(added)
    if model is not None:
        model.resize_token_embeddings(tokenizer.n_vocab)
    return tokenizer, added


def check_conversation(messages, where: str = "the conversation") -> list:
    """``messages`` as a list of ``{"role", "content"}`` dicts; ``ChatFormatError`` naming the first problem."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"{where}: a conversation is a non-empty list of messages {{\"role\", \"content\"}}, "
                              f"got {type(messages).__name__ if messages else 'nothing'}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where}: message {k} must be an object with \"role\" and \"content\", got "
                                  f"{type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ChatFormatError(f"{where}: message {k} has no \"{field}\" field")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"{where}: message {k} has role {m['role']!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"{where}: message {k} ({m['role']}) has content of type "
                                  f"{type(m['content']).__name__}; it must be a string")
        if m["role"] == "system" and k != 0:
            raise ChatFormatError(f"{where}: a system message may only come first (it is message {k})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass
class Rendered:
    """A rendered conversation: ``ids``, the loss ``mask`` (1 where the model learns to write the token) and
    ``prompt_len``, the number of tokens before the final assistant reply (all of them for a generation prompt)."""

    ids: list
    mask: list
    prompt_len: int

    def __len__(self):
        return len(self.ids)


def render(tokenizer, messages, template: str = "chat", add_generation_prompt: bool = False,
           loss_on: str = "assistant") -> Rendered:
    """Token ids and loss mask of a conversation in ``template`` ("chat" or "alpaca"; module docstring).

    ``loss_on``: "assistant" puts the mask on every assistant reply, "last" on
    the final one only (a DPO completion after a multi-turn prompt).
    ``add_generation_prompt``: the conversation must end with a user (or system)
    turn; the assistant header is appended and the mask is all 0 (a prompt to
    generate the reply from). Otherwise the conversation must end with an
    assistant reply, which is what the model learns.
    """
    if template not in TEMPLATES:
        raise ChatFormatError(f"unknown chat template {template!r}; the templates are {', '.join(TEMPLATES)}")
    if loss_on not in LOSS_ON:
        raise ChatFormatError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    messages = check_conversation(messages)
    last = messages[-1]["role"]
    if add_generation_prompt and last == "assistant":
        raise ChatFormatError("a generation prompt must end with a user turn, but the conversation ends with the "
                              "assistant's reply")
    if not add_generation_prompt and last != "assistant":
        raise ChatFormatError(f"the conversation ends with a {last} turn: a training example must end with the "
                              "assistant's reply (the answer the model learns)")
    tok = chat_tokens(tokenizer)
    text_ids = tokenizer.encode_ordinary  # text is never read as special tokens
    ids, mask = [tok.bos], [0]
    prompt_len = None

    def add(part, learn):
        ids.extend(part)
        mask.extend([int(learn)] * len(part))

    def assistant_header():
        return [tok.assistant] if template == "chat" else text_ids(_ALPACA_RESPONSE)

    n_assistant = sum(m["role"] == "assistant" for m in messages)
    seen_assistant = 0
    for m in messages:
        text = text_ids(m["content"])
        if m["role"] == "assistant":
            seen_assistant += 1
            learn = not add_generation_prompt and (loss_on == "assistant" or seen_assistant == n_assistant)
            add(assistant_header(), False)
            if seen_assistant == n_assistant:
                prompt_len = len(ids)
            add(text + [tok.eos], learn)
        elif template == "chat":
            add([tok.system if m["role"] == "system" else tok.user] + text + [tok.eos], False)
        elif m["role"] == "system":
            add(text + text_ids(_ALPACA_SEP), False)
        else:
            add(text_ids(_ALPACA_INSTRUCTION) + text + text_ids(_ALPACA_SEP), False)
    if add_generation_prompt:
        add(assistant_header(), False)
        prompt_len = len(ids)
    return Rendered(ids, mask, prompt_len)


def truncate(rendered: Rendered, max_len: int, cut_prompt: int | None = None) -> tuple[Rendered, int, int]:
    """Fit ``rendered`` into ``max_len`` tokens: ``(fitted, prompt tokens cut, answer tokens cut)``.

    The prompt is cut from the left, by ``cut_prompt`` tokens if given (DPO cuts
    a pair's shared prompt alike), else by as many as needed, keeping at least
    its last token (the assistant header, whose position predicts the answer's
    first token). If the answer alone is still too long, its end is cut (the
    end token goes with it). The mask stays aligned with the ids.
    """
    if max_len < 2:
        raise ChatFormatError(f"a context of {max_len} tokens cannot hold a prompt and an answer")
    n, p = len(rendered.ids), rendered.prompt_len
    if cut_prompt is None:
        cut_prompt = min(max(n - max_len, 0), max(p - 1, 0))
    if not 0 <= cut_prompt <= max(p - 1, 0):
        raise ChatFormatError(f"cannot cut {cut_prompt} tokens from a prompt of {p}")
    ids, mask = rendered.ids[cut_prompt:], rendered.mask[cut_prompt:]
    cut_answer = max(len(ids) - max_len, 0)
    if cut_answer:
        ids, mask = ids[:max_len], mask[:max_len]
    return Rendered(ids, mask, p - cut_prompt), cut_prompt, cut_answer


def next_token_labels(rendered: Rendered, ignore_index: int = -100) -> tuple[list, list]:
    """``(input ids, labels)`` for next-token training, each one shorter than ``rendered``.

    ``labels[t]`` is the token at ``t + 1`` where the mask is 1 there, else
    ``ignore_index``: position t is trained to write the next token exactly
    when that token is one the model must learn (TRL's -100 labels, shifted as
    ``GPT.forward``'s targets are).
    """
    ids, mask = rendered.ids, rendered.mask
    labels = [t if m else ignore_index for t, m in zip(ids[1:], mask[1:])]
    return list(ids[:-1]), labels


@dataclass
class Reply:
    """A generated reply read back (``parse_reply``): its text (up to the end token), whether it ``stopped``
    with the end token, and whether it stayed ``in_template`` (wrote no turn or conversation marker)."""

    text: str
    stopped: bool
    in_template: bool


def parse_reply(tokenizer, new_ids, template: str = "chat") -> Reply:
    """Read back the ids generated after a generation prompt (``render(..., add_generation_prompt=True)``)."""
    tok = chat_tokens(tokenizer)
    new_ids = [int(t) for t in new_ids]
    stopped = tok.eos in new_ids
    body = new_ids[:new_ids.index(tok.eos)] if stopped else new_ids
    text = tokenizer.decode(body)
    in_template = not any(t in tok.role_markers for t in body)
    if template == "alpaca" and any(marker in text for marker in ALPACA_MARKERS):
        in_template = False
    return Reply(text, stopped, in_template)


__all__ = ["SYSTEM_TOKEN", "USER_TOKEN", "ASSISTANT_TOKEN", "END_TOKEN", "PAD_TOKEN", "BOS_TOKEN", "CHAT_TOKENS",
           "ROLES", "TEMPLATES", "LOSS_ON", "ALPACA_MARKERS", "ChatFormatError", "ChatTokens", "chat_tokens",
           "add_chat_tokens", "check_conversation", "Rendered", "render", "truncate",
           "next_token_labels", "Reply", "parse_reply"]
