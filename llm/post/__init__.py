"""Post-training: turn a pre-trained GPT into an assistant.

- ``chat``: the chat format (its special tokens, the "chat" and "alpaca" templates) and ``render``,
  the one function that turns a conversation into token ids and a loss mask;
- ``data``: instruction and preference records (JSON lines with Hugging Face field names, or real
  data fetched once into the cache: Natural Instructions, HHH alignment, TruthfulQA);
- ``packing``: rows of examples for training: right padding, or best-fit-decreasing packing with
  per-conversation positions and a block-diagonal attention mask;
- ``start``: the starting model (ours or a Hugging Face GPT-2 folder), chat tokens added, LoRA
  applied, and the files a run leaves (adapters alone, the merged model);
- ``sft``: supervised fine-tuning, ``python -m llm sft``;
- ``dpo``: direct preference optimisation, ``python -m llm dpo``;
- ``reward_model``, ``rankings``, ``reward``: the reward model (a scalar head read at the last real
  token), Bradley-Terry over pairs and K-way rankings, ``python -m llm reward``;
- ``rollout``, ``rewards``, ``advantages``, ``ppo_loss``, ``ppo``: PPO (RLHF) with a reward model or
  any Python callable as the reward, ``python -m llm ppo``;
- ``pipeline``: the whole roadmap in one run, ``python -m llm pipeline``.

Each training job is a ``llm.trainer.Job``: the one trainer runs it in one process or under mpirun.
"""
