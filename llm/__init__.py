"""llm: tokenizer, data, GPT model, training, generation and evaluation, built on autograd and nn."""
