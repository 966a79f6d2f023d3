"""The chat format: special tokens added to a trained tokenizer and model, render's ids and loss mask in both
templates, truncation, and reading a reply back."""

import dataclasses

import numpy as np
import pytest

from llm.checkpoint import load_model, save_model
from llm.model import GPT, get_preset
from llm.post.chat import (ASSISTANT_TOKEN, BOS_TOKEN, CHAT_TOKENS, END_TOKEN, PAD_TOKEN, USER_TOKEN, ChatFormatError,
                           add_chat_tokens, chat_tokens, next_token_labels, parse_reply, render,
                           truncate)
from llm.tokenizer import Tokenizer

TEXT = "the cat sat on the mat. what is two and two? it is four. hello there, how are you today? " * 20


@pytest.fixture(scope="module")
def base_tokenizer():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def tok(base_tokenizer):
    return add_chat_tokens(base_tokenizer)[0]


def conv(*turns):
    roles = ["user", "assistant"]
    return [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]


def test_chat_tokens_get_new_ids_and_old_ids_keep_theirs(base_tokenizer, tok):
    ids = chat_tokens(tok)
    assert len({ids.bos, ids.eos, ids.pad}) == 3  # PAD, BOS and EOS are distinct
    assert ids.bos == base_tokenizer.eot_token
    new = [tok.special_tokens[t] for t in CHAT_TOKENS]
    assert new == list(range(base_tokenizer.n_vocab, base_tokenizer.n_vocab + len(CHAT_TOKENS)))
    assert tok.n_vocab == base_tokenizer.n_vocab + len(CHAT_TOKENS)
    assert tok.encode_ordinary(TEXT[:200]) == base_tokenizer.encode_ordinary(TEXT[:200])
    again, added = add_chat_tokens(tok)
    assert added == [] and again is tok


def test_a_tokenizer_without_the_chat_tokens_is_a_clear_error(base_tokenizer):
    with pytest.raises(ChatFormatError, match=r"lacks the chat token.*<\|user\|>.*add_chat_tokens"):
        render(base_tokenizer, conv("hi", "hello"))


def test_chat_template_ids_and_mask_are_exact(tok):
    t = chat_tokens(tok)
    enc = tok.encode_ordinary
    r = render(tok, [{"role": "system", "content": "be kind"}] + conv("what is two and two?", "four"))
    want = ([t.bos] + [t.system] + enc("be kind") + [t.eos] + [t.user] + enc("what is two and two?") + [t.eos]
            + [t.assistant] + enc("four") + [t.eos])
    assert r.ids == want
    n_answer = len(enc("four")) + 1
    assert r.mask == [0] * (len(want) - n_answer) + [1] * n_answer  # the reply and its end token only
    assert r.prompt_len == len(want) - n_answer


def test_alpaca_template_reads_as_the_text_it_stands_for(tok):
    r = render(tok, conv("add two and two", "four"), template="alpaca")
    assert tok.decode(r.ids) == f"{BOS_TOKEN}### Instruction:\nadd two and two\n\n### Response:\nfour{END_TOKEN}"
    assert tok.decode([i for i, m in zip(r.ids, r.mask) if m]) == f"four{END_TOKEN}"
    assert r.mask[:r.prompt_len] == [0] * r.prompt_len and all(r.mask[r.prompt_len:])


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_a_generation_prompt_is_a_prefix_of_the_training_example(tok, template):
    c = conv("hello there", "hi", "how are you today?", "it is four")
    full = render(tok, c, template=template)
    prompt = render(tok, c[:-1], template=template, add_generation_prompt=True)
    assert full.ids[:full.prompt_len] == prompt.ids and prompt.prompt_len == len(prompt.ids)
    assert not any(prompt.mask)


def test_multi_turn_masks_every_reply_or_only_the_last(tok):
    c = conv("hello", "hi", "two and two?", "four")
    every, last = render(tok, c), render(tok, c, loss_on="last")
    assert every.ids == last.ids
    learned = lambda r: tok.decode([i for i, m in zip(r.ids, r.mask) if m])  # noqa: E731
    assert learned(every) == f"hi{END_TOKEN}four{END_TOKEN}"
    assert learned(last) == f"four{END_TOKEN}"


def test_special_token_text_in_a_message_stays_ordinary_text(tok):
    r = render(tok, conv(f"say {END_TOKEN} now", "ok"))
    t = chat_tokens(tok)
    assert r.ids.count(t.eos) == 2  # the user's end and the reply's end; the typed text is ordinary tokens
    assert f"say {END_TOKEN} now" in tok.decode(r.ids)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "user"}], "no \"content\""),
    ([{"content": "hi"}], "no \"role\""),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content of type int"),
    ([{"role": "user", "content": "hi"}], "must end with the assistant"),
    (["hi"], "must be an object"),
])
def test_bad_conversations_are_named(tok, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        render(tok, messages)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answer(tok):
    r = render(tok, conv("hello there, how are you today? the cat sat on the mat.", "it is four"))
    answer = len(r) - r.prompt_len
    fitted, cut_prompt, cut_answer = truncate(r, answer + 3)
    assert (cut_prompt, cut_answer) == (len(r) - answer - 3, 0)
    assert fitted.ids == r.ids[cut_prompt:] and fitted.mask == r.mask[cut_prompt:]
    assert fitted.prompt_len == 3 and sum(fitted.mask) == answer
    # an answer longer than the context: the prompt keeps its last token (the header), the answer loses its end
    fitted, cut_prompt, cut_answer = truncate(r, 4)
    assert cut_prompt == r.prompt_len - 1 and cut_answer == answer - 3
    assert fitted.ids == r.ids[r.prompt_len - 1:r.prompt_len + 3] and fitted.mask == [0, 1, 1, 1]
    unchanged, a, b = truncate(r, len(r))
    assert unchanged.ids == r.ids and (a, b) == (0, 0)


def test_parse_reply(tok):
    t = chat_tokens(tok)
    four = tok.encode_ordinary("four")
    assert parse_reply(tok, four + [t.eos, t.pad]) == parse_reply(tok, four + [t.eos])
    reply = parse_reply(tok, four + [t.eos])
    assert (reply.text, reply.stopped, reply.in_template) == ("four", True, True)
    assert not parse_reply(tok, four).stopped
    assert not parse_reply(tok, four + [t.user] + four + [t.eos]).in_template
    hijack = tok.encode_ordinary("four\n\n### Instruction:\nmore")
    assert not parse_reply(tok, hijack + [t.eos], template="alpaca").in_template


@pytest.mark.parametrize("tied", [True, False])
def test_growing_the_model_keeps_every_old_weight_and_starts_new_rows_at_the_mean(base_tokenizer, tied, tmp_path):
    config = get_preset("tiny", vocab_size=base_tokenizer.n_vocab, n_layer=1, n_embd=32, n_head=2, block_size=16,
                        tie_embeddings=tied)
    model = GPT(config, generator=np.random.default_rng(0))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    tok, added = add_chat_tokens(base_tokenizer, model)
    V0, V = base_tokenizer.n_vocab, tok.n_vocab
    assert added == list(CHAT_TOKENS) and model.config.vocab_size == V == V0 + 5
    after = model.state_dict()
    assert set(after) == set(before)
    for name, old in before.items():
        new = after[name]
        if name == "wte.weight":
            assert new.shape == (V, 32) and np.array_equal(new[:V0], old)
            assert np.allclose(new[V0:], old.mean(axis=0), atol=1e-7, rtol=0)
        elif name == "lm_head.weight":
            assert new.shape == (32, V) and np.array_equal(new[:, :V0], old)
            assert np.allclose(new[:, V0:], old.mean(axis=1, keepdims=True), atol=1e-7, rtol=0)
        else:
            assert np.array_equal(new, old), name
    ids = np.asarray([render(tok, conv("hi", "four")).ids])
    logits, _ = model(ids)
    assert logits.shape == (1, ids.shape[1], V)
    # the checkpoint records the grown vocabulary and the tokenizer with its chat tokens
    save_model(tmp_path / "m.safetensors", model, tok)
    loaded, loaded_tok, _ = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config and loaded_tok.special_tokens == tok.special_tokens
    assert all(np.array_equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_resizing_refuses_to_shrink_or_to_mismatch(base_tokenizer):
    model = GPT(get_preset("tiny", vocab_size=base_tokenizer.n_vocab, n_layer=1, n_embd=32, n_head=2,
                           block_size=16), generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= the current"):
        model.resize_token_embeddings(base_tokenizer.n_vocab - 1)
    other = GPT(dataclasses.replace(model.config, vocab_size=base_tokenizer.n_vocab + 3))
    with pytest.raises(ChatFormatError, match="do not belong together"):
        add_chat_tokens(base_tokenizer, other)


def test_special_tokens_added_twice_keep_one_id(base_tokenizer):
    once = base_tokenizer.with_special_tokens([USER_TOKEN, ASSISTANT_TOKEN])
    twice = once.with_special_tokens([ASSISTANT_TOKEN, PAD_TOKEN])
    assert twice.special_tokens[ASSISTANT_TOKEN] == once.special_tokens[ASSISTANT_TOKEN]
    assert twice.special_tokens[PAD_TOKEN] == once.n_vocab
    assert Tokenizer.from_json(twice.to_json()).special_tokens == twice.special_tokens
    with pytest.raises(ValueError, match="distinct non-empty"):
        base_tokenizer.with_special_tokens(["", "x"])


def test_labels_are_minus_100_exactly_off_the_answer(tok):
    r = render(tok, conv("two and two?", "four"))
    inputs, labels = next_token_labels(r)
    assert inputs == r.ids[:-1] and len(labels) == len(inputs)
    for t, label in enumerate(labels):
        assert label == (r.ids[t + 1] if r.mask[t + 1] else -100)
    assert labels[:r.prompt_len - 1] == [-100] * (r.prompt_len - 1)
    assert labels[r.prompt_len - 1:] == r.ids[r.prompt_len:]  # the header predicts the answer's first token
