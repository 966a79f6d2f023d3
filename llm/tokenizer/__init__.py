"""llm.tokenizer: a byte-level BPE tokenizer in the style of GPT-2, tiktoken and minbpe.

    >>> from llm.tokenizer import Tokenizer
    >>> tok = Tokenizer.train(text, vocab_size=4096, pattern="gpt4")   # special: <|endoftext|> = 4095
    >>> tok.decode(tok.encode("hello world")) == "hello world"
    True
    >>> tok.save("tok.json"); Tokenizer.load("tok.json")

Modules: ``patterns`` (the GPT-2 and GPT-4 split regexes), ``train`` (incremental BPE training),
``bpe`` (tiktoken's merge-by-rank rule for one chunk), ``tokenizer`` (the Tokenizer class),
``formats`` (our JSON format, tiktoken rank files, GPT-2's encoder.json + vocab.bpe), ``cli``
(``python -m llm tokenizer train|encode|decode``).
"""

from .formats import TokenizerFormatError, bytes_to_unicode
from .patterns import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, SPLIT_PATTERNS
from .tokenizer import ENDOFTEXT, Tokenizer
from .train import train_merges

__all__ = [
    "Tokenizer", "TokenizerFormatError", "ENDOFTEXT", "GPT2_SPLIT_PATTERN", "GPT4_SPLIT_PATTERN", "SPLIT_PATTERNS",
    "bytes_to_unicode", "train_merges",
]
