"""Prompt variants for self-consistency: the same input asked in several slightly different ways.

Sample 0 is always the task's own prompt (so its ledger key is the plain request's key). Sample
``s > 0`` uses the instruction ``[instruction, *teacher.paraphrases][s % (1 + len(paraphrases))]`` and,
with ``teacher.shuffle_labels``, the label list in an order shuffled with seed ``s`` (never the original order). Only the prompt
changes: answers are parsed against, and distributions are reported over, the task's label order.
An item whose samples disagree is one the teacher is unsure about; curate drops it by agreement.
"""

from __future__ import annotations

import random

from protege.task import TaskSpec


def variant_task(task: TaskSpec, sample: int) -> TaskSpec:
    """The task as sample ``sample`` sees it (``task`` itself for sample 0 or when no variants are set)."""
    cfg = task.teacher
    paraphrases = list(getattr(cfg, "paraphrases", None) or [])
    shuffle = bool(getattr(cfg, "shuffle_labels", False))
    if sample == 0 or not (paraphrases or shuffle):
        return task
    update: dict = {}
    if paraphrases:
        update["instruction"] = [task.instruction, *paraphrases][sample % (1 + len(paraphrases))]
    if shuffle:
        labels, rng = list(task.labels), random.Random(f"protege-labels-{sample}")
        for _ in range(16):  # a shuffle that happens to keep the original order is no variant: draw again
            rng.shuffle(labels)
            if labels != list(task.labels):
                break
        update["labels"] = labels
    return task.model_copy(update=update)


def describe_variant(task: TaskSpec, sample: int) -> dict:
    """What sample ``sample`` changed, for the per-sample record (``{}`` for the plain prompt)."""
    v = variant_task(task, sample)
    if v is task:
        return {}
    out = {}
    if v.instruction != task.instruction:
        out["instruction"] = 1 + [*task.teacher.paraphrases].index(v.instruction)
    if v.labels != task.labels:
        out["label_order"] = v.labels
    return out
