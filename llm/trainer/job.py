"""What a training job gives the trainer: a model, its batches, a loss, and what to evaluate.

A batch is a dict of arrays that share their first axis (rows), e.g.
``{"input_ids": (B, T), "labels": (B, T)}``: the trainer cuts it into
micro-batches and the pipeline stages along that axis, and each
data-parallel replica draws its own rows. The defaults below are next-token
prediction on ``input_ids`` / ``labels`` (``-100`` where no loss is wanted);
a job overrides what differs.

The loss returns ``(summed loss, count)``: the sum over the batch's terms and
how many terms there are. The trainer divides every micro-batch's sum by the
count of the whole global batch (``count`` gives it before the forward), so
the mean is over every token of the step, however the tokens fall between
micro-batches and ranks (masked tokens, uneven documents), never a mean of
means.
"""

from __future__ import annotations

import autograd


class Job:
    """A training job (pre-training, SFT, reward model, DPO, PPO's updates); subclass it.

    Required: ``name``, ``build_model()``, ``train_sampler(rank, world)``.
    Everything else has a default for next-token prediction.
    """

    #: the job's name, stored in its checkpoints ("pretrain", "sft", ...)
    name = "job"

    # -- what is trained --------------------------------------------------------------
    def build_model(self):
        """The float32 model, built alike on every rank (seeded): the trainer keeps each rank's part of it."""
        raise NotImplementedError

    def param_groups(self, model, weight_decay: float) -> list:
        """Optimizer groups over ``model``'s trainable parameters (default: decay matrices, not biases, norms or
        embeddings: ``nn.optim.param_groups_for_gpt``)."""
        from nn.optim import param_groups_for_gpt

        return param_groups_for_gpt(model, weight_decay)

    # -- data ------------------------------------------------------------------------------
    def train_sampler(self, rank: int, world: int):
        """The training batches of data-parallel replica ``rank`` of ``world``: an object with ``next_batch()`` (a
        batch of this replica's rows), ``state_dict()`` and ``load_state_dict()`` (where the data continues, the
        same on every rank)."""
        raise NotImplementedError

    def inputs(self, batch):
        """What the model's first stage takes: token ids ``(rows, T)``."""
        return batch["input_ids"]

    def model_kwargs(self, batch) -> dict:
        """Keyword arguments of the model's forward for this batch besides the ids (every pipeline stage gets
        them): e.g. ``position_ids`` and ``attention_mask`` of packed rows. Default: none."""
        return {}

    def count(self, batch) -> int:
        """The number of terms ``loss`` sums over this batch (labels that are not ``-100``)."""
        return int((_host(batch["labels"]) != -100).sum())

    def loss(self, logits, batch):
        """``(summed loss, count)``: the next-token cross-entropy summed over the labels that are not -100."""
        labels = batch["labels"]
        B, T, V = logits.shape
        total = autograd.cross_entropy(logits.reshape(B * T, V),  # (B*T, V)
                                       _on(labels, logits).reshape(B * T),  # (B*T,)
                                       ignore_index=-100, reduction="sum")
        return total, self.count(batch)

    def flops_per_token(self, config) -> float:
        """Training FLOPs per token (for MFU): ``llm.sizing.flops_per_token`` at the model's context length."""
        from ..sizing import flops_per_token

        return flops_per_token(config)

    # -- around the loop -------------------------------------------------------------------
    def train_metrics(self, trainer) -> dict:
        """Metrics of the training steps since the last metrics line, added to it (e.g. DPO's rewards, gathered
        by the loss); a collective call at every logged step. Default: none."""
        return {}

    def evaluate(self, trainer, step: int) -> dict:
        """Metrics at an evaluation (e.g. ``{"val_loss": trainer.eval_loss(batches)}``); a collective call."""
        return {}

    def on_evaluated(self, trainer, step: int, metrics: dict, last: bool):
        """After an evaluation, and once at the end (``last``): e.g. print a sample from ``trainer.full_model()``;
        a collective call."""

    def checkpoint_metadata(self) -> dict:
        """Extra metadata for the job's checkpoints: ``{"tokenizer": JSON text}`` and whatever it needs later."""
        return {}

    def summary(self, trainer, step: int, metrics: dict) -> str | None:
        """The last line a finished run prints (rank 0), or None."""
        return None


def _host(array):
    from autograd import backend

    return backend.to_device(array, "cpu")


def _on(array, like):
    """``array`` on the device of Tensor ``like``."""
    from autograd import backend

    return backend.to_device(array, like.device)


__all__ = ["Job"]
