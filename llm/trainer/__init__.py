"""The one trainer of every training job: pre-training, SFT, reward model, DPO, PPO's updates.

A job (``Job``) gives a model, its batches, a loss that returns (summed loss,
count) and what to evaluate; ``Trainer(job, config, comm).run()`` does the
rest the same way in one process and under mpirun: the step (forward,
backward, accumulation, clipping, mixed precision, AdamW), the layout (data
and pipeline parallelism, ZeRO-1: ``layout``), checkpoints that resume
bitwise on any layout (``checkpoint``), metrics, progress and MFU
(``metrics``), and a checkpoint on Ctrl-C or SIGTERM (``signals``).
``add_trainer_flags`` gives a job's command the flags they all share.
"""

from .checkpoint import CheckpointWriteError, ResumeError, TrainingCheckpoint, step_seed
from .config import TrainerConfig, add_trainer_flags
from .job import Job
from .layout import Layout, StepResult, stage_layout
from .metrics import MetricsWriter, measure_matmul_flops, read_metrics
from .trainer import CHECKPOINT_NAME, MAX_CONSECUTIVE_SKIPS, SetupError, Trainer, TrainingDiverged, exit_code_for

__all__ = ["Job", "Trainer", "TrainerConfig", "add_trainer_flags", "Layout", "StepResult", "stage_layout",
           "TrainingCheckpoint", "ResumeError", "CheckpointWriteError", "SetupError", "TrainingDiverged",
           "exit_code_for", "MetricsWriter", "read_metrics", "measure_matmul_flops", "step_seed", "CHECKPOINT_NAME",
           "MAX_CONSECUTIVE_SKIPS"]
