"""The training-step layer: tasks (examples -> text columns, embeddings -> loss)."""

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
]
