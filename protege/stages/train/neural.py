"""Neural students for the train stage: a fine-tuned encoder or a causal LM answering with the label word
(classify), and a causal LM trained on the teacher's text answers (extract / generate).

Settings come from ``task.student`` (model, epochs, batch size, lr, LoRA...) and ``task.train`` (alpha,
temperature, seed); every combination was already checked when the task file was loaded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protege.registry import capabilities

def fit_student(task, texts: Sequence[str], probs: np.ndarray, hard: np.ndarray, *,
                sample_weight: np.ndarray | None = None, dev: tuple[Sequence[str], np.ndarray] | None = None,
                class_weights: np.ndarray | None = None):
    """Build and train the task's ``encoder`` or ``causal_lm`` student on teacher-labelled classify data.

    The static student keeps its own path in :mod:`protege.stages.train`. Settings come from ``task.student``
    (model, epochs, batch size, lr, LoRA...) and ``task.train`` (alpha, temperature, seed).
    """
    s, t = task.student, task.train
    if s.kind == "encoder":
        from protege.students.encoder import EncoderClassifier

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
    from protege.teachers.prompts import system_prompt
    from protege.students.causal_lm import CausalLMStudent

    s, t = task.student, task.train
    teacher = teacher_tok = None
    wants_kd = s.kd in ("auto", "logits")
    if capabilities(task.teacher.backend).logits and (s.init_from_teacher or (wants_kd and s.model is None)):
        from protege.teachers.hf import load_causal_lm

        teacher_tok, teacher = load_causal_lm(task.teacher.model, task.teacher.gguf_file, task.teacher.dtype)
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
    from protege.task import TaskError
    from protege.teachers.prompts import system_text, teacher_messages
    from protege.students.causal_lm import CausalLMStudent

    s, t = task.student, task.train
    have_topk = topk is not None and any(x is not None for x in topk)
    kd = s.kd if s.kd != "auto" else ("topk" if have_topk else "none")
    if kd == "topk" and not have_topk:
        raise TaskError("student.kd: topk needs the per-token top-k log-probs the teacher returns with its answers, "
                        "and none were stored (a server without logprobs); use student.kd: auto / none, or logits "
                        "with a local teacher")
    teacher = teacher_tok = None
    if s.init_from_teacher or kd == "logits":
        from protege.teachers.hf import load_causal_lm

        teacher_tok, teacher = load_causal_lm(task.teacher.model, task.teacher.gguf_file, task.teacher.dtype)
    prompt, max_new = system_text(task), task.teacher.max_tokens
    if s.init_from_teacher:
        student = CausalLMStudent.from_teacher(teacher, teacher_tok, s.keep_every, drop=s.drop_layers,
                                               system_prompt=prompt, max_new_tokens=max_new)
    else:
        student = CausalLMStudent.from_base(s.model or task.teacher.model,
                                            s.gguf_file or (None if s.model else task.teacher.gguf_file),
                                            system_prompt=prompt, qlora=bool(s.lora and s.lora.qlora),
                                            max_new_tokens=max_new)
    student.max_input_tokens = task.teacher.max_input_tokens
    student.runtime, student.compute_type = s.runtime, s.compute_type
    if s.constrained:
        from protege.students.fast_lm import string_fields

        student.fields = string_fields(task.schema_)
    student.fit(list(inputs), list(outputs), teacher=teacher if kd == "logits" else None, teacher_tokenizer=teacher_tok,
                teacher_messages=[teacher_messages(task, x) for x in inputs] if kd == "logits" else None,
                topk=list(topk) if kd == "topk" else None, kd=kd, alpha=t.alpha, beta=s.beta, temperature=1.0,
                epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, grad_accum=s.grad_accum, max_length=s.max_length,
                lora=s.lora, seed=t.seed, sample_weight=sample_weight)
    return student, kd
