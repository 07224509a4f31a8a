"""What train.py is built from: tasks (examples -> text columns, embeddings -> loss), one
optimisation step's forward and backward (plainly or with gradient caching), learning-rate
schedules, checkpoints that survive a crash, and metric loggers."""

from training.schedules import warmup_schedule
from training.step import StepResult, embed_columns, train_step
from training.tasks import (
    ContrastiveTask,
    CoSENTTask,
    CosineSimilarityTask,
    DistillationTask,
    InfoNCETask,
    ListwiseKLTask,
    MarginMSETask,
    ScoredPairTask,
    Task,
    TextBatch,
    TripletTask,
)

__all__ = [
    "CoSENTTask",
    "ContrastiveTask",
    "CosineSimilarityTask",
    "DistillationTask",
    "InfoNCETask",
    "ListwiseKLTask",
    "MarginMSETask",
    "ScoredPairTask",
    "StepResult",
    "Task",
    "TextBatch",
    "TripletTask",
    "embed_columns",
    "train_step",
    "warmup_schedule",
]
