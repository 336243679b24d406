"""Students: found by ``student.kind`` in the task file, or by the folder a trained one was saved to.

=========  =========================================  ==================================================
kind       class                                      what it is
=========  =========================================  ==================================================
static     ``classifier.StaticClassifier``            static token embeddings + linear head; ~0.1 ms/item
encoder    ``encoder.EncoderClassifier``              a small transformer encoder (MiniLM) fine-tuned
causal_lm  ``causal_lm.CausalLMStudent``              a small chat LM (SFT + token KD, LoRA), servable by
                                                      Ollama / vLLM
=========  =========================================  ==================================================

Every saved student folder has a ``config.json`` naming its kind (``protege_student``), so
:func:`load_student` needs nothing but the path. Imports are lazy: the static student must not pay for
importing transformers / TRL.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Sequence

import numpy as np

STUDENTS: dict[str, tuple[str, str]] = {
    "static": ("protege.students.classifier", "StaticClassifier"),
    "encoder": ("protege.students.encoder", "EncoderClassifier"),
    "causal_lm": ("protege.students.causal_lm", "CausalLMStudent"),
}


def student_class(kind: str) -> type:
    try:
        mod, name = STUDENTS[kind]
    except KeyError:
        raise ValueError(f"unknown student kind {kind!r}; use one of {sorted(STUDENTS)}") from None
    return getattr(import_module(mod), name)


def load_student(path: str | Path):
    """Load any saved student; its kind is read from ``config.json``."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
    kind = json.loads(cfg_file.read_text(encoding="utf-8")).get("protege_student")
    if kind is None:
        raise ValueError(f"{cfg_file} does not say which protege student it is (no 'protege_student' key)")
    return student_class(kind).from_pretrained(p)


# -- process topology (accelerate launch / torchrun / deepspeed) ----------------------------------

def is_main_process() -> bool:
    """True outside distributed runs; under ``accelerate launch`` (any launcher setting RANK) on rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """Barrier across ranks when a process group is up (the Trainer starts it); else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def work_dir(prefix: str, given=None):
    """Scratch folder for Trainer checkpoints, the same path on every rank of one launch.

    Under ``accelerate launch`` the ranks must agree on ``output_dir``: rank 0 writes checkpoints and
    every rank reads the best one back. Ranks of one launch share the launcher as parent process (and
    torchrun's run id); across machines pass a folder on a shared filesystem (``given``).
    """
    import shutil
    import tempfile

    if given is not None:
        yield str(given)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield d
        return
    run = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getppid())
    d = Path(tempfile.gettempdir()) / f"{prefix}{run}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield str(d)
    finally:
        wait_for_everyone()
        if is_main_process():
            shutil.rmtree(d, ignore_errors=True)


def multi_process_cpu() -> bool:
    """A multi-process launch on a machine without CUDA: the Trainer must be told ``use_cpu`` to run DDP
    over gloo (otherwise every rank trains alone on all the data)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# -- the train stage's neural students -------------------------------------------------------------

def fit_student(task, texts: Sequence[str], probs: np.ndarray, hard: np.ndarray, *,
                sample_weight: np.ndarray | None = None, dev: tuple[Sequence[str], np.ndarray] | None = None,
                class_weights: np.ndarray | None = None):
    """Build and train the task's ``encoder`` or ``causal_lm`` student on teacher-labelled classify data.

    The static student keeps its own path in :mod:`protege.train`. Settings come from ``task.student``
    (model, epochs, batch size, lr, LoRA...) and ``task.train`` (alpha, temperature, seed).
    """
    s, t = task.student, task.train
    if s.kind == "encoder":
        from .encoder import EncoderClassifier

        student = EncoderClassifier.from_base(s.model or s.embedder, task.labels, max_length=s.max_length,
                                              seed=t.seed)
        return student.fit(texts, probs, hard_labels=hard, sample_weight=sample_weight, dev=dev, alpha=t.alpha,
                           temperature=t.temperature, epochs=s.epochs, lr=s.lr or 5e-5, batch_size=s.batch_size,
                           grad_accum=s.grad_accum, patience=s.patience, seed=t.seed, class_weights=class_weights)
    if s.kind == "causal_lm":
        return _fit_causal_lm_classifier(task, texts, hard)
    raise ValueError(f"fit_student handles encoder / causal_lm students, not {s.kind!r}")


def _fit_causal_lm_classifier(task, texts: Sequence[str], hard: np.ndarray):
    """A chat LM that answers a classify task with the label word (SFT on the teacher's labels).

    Token KD needs the teacher's logits on the answer tokens, so it is used when the teacher is a local
    model (``teacher.backend: hf``); an API teacher's label distribution is already in the hard label.
    """
    from ..task import TaskError
    from ..teachers.base import system_prompt
    from .causal_lm import CausalLMStudent

    s, t = task.student, task.train
    teacher = teacher_tok = None
    wants_kd = s.kd in ("auto", "logits")
    if task.teacher.backend == "hf" and (s.init_from_teacher or (wants_kd and s.model is None)):
        from ..teachers.hf import load_causal_lm

        teacher_tok, teacher = load_causal_lm(task.teacher.model, task.teacher.gguf_file, task.teacher.dtype)
    elif s.init_from_teacher:
        raise TaskError("student.init_from_teacher needs a local teacher (teacher.backend: hf)")
    elif s.kd == "logits":
        raise TaskError("student.kd: logits needs a local teacher (teacher.backend: hf); use kd: none")
    if s.kd == "topk":
        raise TaskError("student.kd: topk trains on stored per-token top-k log-probs of generated answers "
                        "(extract / generate data); a classify task's answer is one label: use kd: logits "
                        "(local teacher), auto or none")
    prompt = system_prompt(task)
    if s.init_from_teacher:
        student = CausalLMStudent.from_teacher(teacher, teacher_tok, s.keep_every, drop=s.drop_layers,
                                               system_prompt=prompt, max_new_tokens=8)
    else:
        ref = s.model or task.teacher.model
        student = CausalLMStudent.from_base(ref, s.gguf_file or (None if s.model else task.teacher.gguf_file),
                                            system_prompt=prompt, qlora=bool(s.lora and s.lora.qlora),
                                            max_new_tokens=8)
    student.labels = list(task.labels)
    student.max_input_tokens = max(8, s.max_length - 96)  # room for the instruction and the answer
    answers = [task.labels[i] for i in hard]
    use_kd = teacher is not None and wants_kd
    return student.fit(texts, answers, teacher=teacher if use_kd else None, teacher_tokenizer=teacher_tok,
                       kd="logits" if use_kd else "none", alpha=t.alpha, beta=s.beta, temperature=1.0,
                       epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, grad_accum=s.grad_accum,
                       max_length=s.max_length, lora=s.lora, seed=t.seed)


# -- extract / generate tasks: a causal LM trained on the teacher's text answers -------------------

def fit_text_student(task, inputs: Sequence[str], outputs: Sequence[str], topk: Sequence[dict | None] | None = None,
                     sample_weight: Sequence[float] | None = None):
    """A ``CausalLMStudent`` trained on (input, teacher output) pairs of an extract / generate task.

    SFT on the completion, plus token-level KD (``student.kd``): ``auto`` uses the top-k log-probs stored
    with the teacher's answers when there are any, else SFT only; ``logits`` runs a local teacher's full
    distributions on the same completion tokens (its own few-shot prompt); ``topk`` requires stored
    top-k. The student's prompt is the task's instruction (and schema) without the worked examples.
    Returns ``(student, kd used)``.
    """
    from ..task import TaskError
    from ..textgen import system_text, teacher_messages
    from .causal_lm import CausalLMStudent

    s, t = task.student, task.train
    local = task.teacher.backend == "hf"
    have_topk = topk is not None and any(x is not None for x in topk)
    kd = s.kd if s.kd != "auto" else ("topk" if have_topk else "none")
    if kd == "topk" and not have_topk:
        raise TaskError("student.kd: topk needs the per-token top-k log-probs the teacher returns with its answers, "
                        "and none were stored (teacher.top_logprobs: 0, a server without logprobs, or an extraction "
                        "API call); use student.kd: auto / none, or logits with a local teacher")
    if kd == "logits" and not local:
        raise TaskError("student.kd: logits needs a local teacher (teacher.backend: hf); use kd: auto, topk or none")
    if s.init_from_teacher and not local:
        raise TaskError("student.init_from_teacher needs a local teacher (teacher.backend: hf); set student.model "
                        "to a small local causal LM instead")
    teacher = teacher_tok = None
    if s.init_from_teacher or kd == "logits":
        from ..teachers.hf import load_causal_lm

        teacher_tok, teacher = load_causal_lm(task.teacher.model, task.teacher.gguf_file, task.teacher.dtype)
    prompt, max_new = system_text(task), task.teacher.max_tokens
    if s.init_from_teacher:
        student = CausalLMStudent.from_teacher(teacher, teacher_tok, s.keep_every, drop=s.drop_layers,
                                               system_prompt=prompt, max_new_tokens=max_new)
    else:
        if s.model is None and not local:
            raise TaskError("student.model: an API teacher has no local weights to start from; set student.model to "
                            "a local causal LM folder (or pkg:<module>)")
        student = CausalLMStudent.from_base(s.model or task.teacher.model,
                                            s.gguf_file or (None if s.model else task.teacher.gguf_file),
                                            system_prompt=prompt, qlora=bool(s.lora and s.lora.qlora),
                                            max_new_tokens=max_new)
    student.max_input_tokens = task.teacher.max_input_tokens
    student.fit(list(inputs), list(outputs), teacher=teacher if kd == "logits" else None, teacher_tokenizer=teacher_tok,
                teacher_messages=[teacher_messages(task, x) for x in inputs] if kd == "logits" else None,
                topk=list(topk) if kd == "topk" else None, kd=kd, alpha=t.alpha, beta=s.beta, temperature=1.0,
                epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, grad_accum=s.grad_accum, max_length=s.max_length,
                lora=s.lora, seed=t.seed, sample_weight=sample_weight)
    return student, kd
