"""Small fixtures the reward-model and PPO tests share (tests/test_reward.py, tests/test_ppo.py,
tests/mpi/test_rlhf_mpi.py): a tiny 'SFT' checkpoint with the chat tokens, preference and prompt files, and a toy
programmatic reward."""

import json

import numpy as np

from llm.model import GPT, get_preset

TEXT = "the cat sat on the mat. good answer, bad answer. what is two and two? it is four. hello there. " * 20
PROMPTS = ["the cat", "what is two and two", "hello there", "the mat", "good answer", "bad answer", "it is four",
           "sat on"]


def chat_checkpoint(path, seed=0, block=48, n_embd=32, vocab=300):
    """A tiny 'SFT' checkpoint: a 1-layer GPT whose tokenizer has the chat tokens; returns its path."""
    from llm.checkpoint import save_model
    from llm.post.chat import add_chat_tokens
    from llm.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, vocab_size=vocab)
    model = GPT(get_preset("tiny", vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=n_embd, block_size=block),
                generator=np.random.default_rng(seed))
    tok, _ = add_chat_tokens(tok, model)
    save_model(path, model, tok)
    return path


def preference_file(path, n=48, seed=0):
    """Pairs whose chosen reply says 'good' and rejected 'bad' (and one 3-way ranking): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for k in range(n):
            w = int(rng.integers(1, 4))
            f.write(json.dumps({"prompt": PROMPTS[k % 4], "chosen": " ".join(["good"] * w),
                                "rejected": " ".join(["bad"] * w)}) + "\n")
        f.write(json.dumps({"prompt": "the cat", "responses": ["good good", "it is four", "bad bad"]}) + "\n")
    return path


def prompt_file(path, repeat=3):
    """Prompt records for PPO (the 8 prompts, ``repeat`` times)."""
    with open(path, "w") as f:
        for q in PROMPTS * repeat:
            f.write(json.dumps({"prompt": q}) + "\n")
    return path


def vowel_reward(prompts, responses, records):
    """1 when the response starts with a vowel: a toy reward whose chance level under a random policy is low."""
    return [float(r.lstrip()[:1].lower() in "aeiou") for r in responses]


def read_metrics(path):
    return [json.loads(line) for line in open(path)]
