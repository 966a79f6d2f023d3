"""Pre-tokenisation ("split") patterns: the regexes that cut text into chunks before BPE runs.

BPE never merges across a chunk boundary, so these patterns decide what a token can be: letters
stay apart from digits and punctuation, a word keeps its leading space (" the"), and English
contractions ("'s", "'ll") become chunks of their own. Both patterns are written for the `regex`
package (``\\p{L}`` is "any letter", ``\\p{N}`` "any number"; ``++`` and ``?+`` are possessive
quantifiers that never give back what they matched).
"""

# GPT-2 (also r50k_base / p50k_base in tiktoken), in tiktoken's possessive spelling. It splits
# exactly as GPT-2's original encoder.py pattern
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# does (tests/test_tokenizer.py checks this on random text); the possessive form is faster.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# GPT-4 (cl100k_base in tiktoken). Differences from GPT-2: contractions match in any case,
# numbers are cut into runs of at most 3 digits, a letter run may take one leading
# non-letter (so "_name" or "(x" stay together), and newlines are grouped apart from spaces.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

# Names accepted wherever a pattern is asked for (the command line's --pattern, Tokenizer.train).
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}


def resolve_pattern(pattern):
    """Return the regex for ``pattern``: a name from SPLIT_PATTERNS ("gpt2", "gpt4") or a regex string itself."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a name in {sorted(SPLIT_PATTERNS)} or a regex), "
                        f"got {type(pattern).__name__}")
    return SPLIT_PATTERNS.get(pattern, pattern)


def pattern_name(pattern):
    """The name ("gpt2", "gpt4") of a known pattern string, or None for a custom regex."""
    for name, pat in SPLIT_PATTERNS.items():
        if pat == pattern:
            return name
    return None
