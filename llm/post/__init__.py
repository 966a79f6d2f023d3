"""Post-training: supervised fine-tuning, the reward model, DPO and PPO, each a job of the one trainer."""
