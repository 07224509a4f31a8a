"""The training-step layer: tasks (examples -> text columns, embeddings -> loss) and one
optimisation step's forward and backward, plainly or with gradient caching."""

from training.step import embed_columns, train_step
from training.tasks import (
    ContrastiveTask,
    InfoNCETask,
    ScoredPairTask,
    Task,
    TextBatch,
    TripletTask,
)

__all__ = [
    "ContrastiveTask",
    "InfoNCETask",
    "ScoredPairTask",
    "Task",
    "TextBatch",
    "TripletTask",
    "embed_columns",
    "train_step",
]
