"""The causal-LM student for extract / generate tasks: a small chat model trained on the teacher's outputs.

Training is TRL's ``SFTTrainer`` on prompt + completion sequences rendered with the student's chat
template, cross-entropy on the completion only, plus (optionally) token-level KD
(:class:`protege.students.kd_trainer.TokenKDTrainer`):

* ``kd="logits"`` — a local teacher's full next-token distributions, computed on the fly on the same
  completion tokens (generalized JSD, TRL's GKD convention). The teacher may see its own, longer prompt
  (few-shot examples the student no longer needs); only the completion positions are matched.
* ``kd="topk"`` — top-k log-probs stored with the teacher's outputs (what an API teacher returns),
  matched with ``topk_kl``.

Both need the teacher's tokens to mean the same thing to the student. Identical tokenizers are the
normal case (same family, or :func:`init_from_teacher`); a student vocabulary contained in the teacher's
is mapped by token string; anything else raises :class:`TokenizerMismatch` instead of training on
misaligned distributions.

LoRA adapters (peft) are merged into the weights on save, so the saved folder is a plain HF model that
llama.cpp's converter, Ollama or vLLM take as is. QLoRA loads the base in 4-bit and needs bitsandbytes
and a CUDA GPU.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Sequence

from protege.students.lm_tokens import (TokenizerMismatch, decode, encode_example, render,
                                         topk_from_openai, vocab_map)
from protege.students.lm_weights import init_from_teacher, plain_float, qlora_problem
from protege.task import TaskError, resolve_model_path


class CausalLMStudent:
    """``fit / predict / save_pretrained / from_pretrained`` for a chat model answering one task."""

    def __init__(self, model, tokenizer, system_prompt: str = "", max_new_tokens: int = 128,
                 base: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_new_tokens = system_prompt, max_new_tokens
        self.base = base or {}  # how to reload the base in 16-bit (QLoRA merge)
        self.labels: list[str] | None = None  # classify tasks: predict() maps answers onto these
        self.max_input_tokens: int | None = None  # inputs are clipped to this many tokens
        self.history: list[dict] = []
        # inference: the fast runtime (protege.students.fast_lm) and the schema fields it may constrain
        self.runtime, self.compute_type, self.fields = "transformers", "float32", None
        self.fast = None
        self.memory = None  # extraction: field values of the training answers (drafts for the fast runtime)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_base(cls, ref: str, gguf_file: str | None = None, *, system_prompt: str = "", qlora: bool = False,
                  dtype: str = "float32", max_new_tokens: int = 128) -> "CausalLMStudent":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(ref)
        if not Path(path).exists():
            raise TaskError(f"student.model: local path {path!r} does not exist")
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        if qlora:
            why = qlora_problem()
            if why:
                raise TaskError(f"student.lora.qlora: {why}. Set qlora: false to train plain LoRA adapters on "
                                f"16/32-bit weights, or run on a GPU machine.")
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        tok_kw = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **tok_kw)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype), **kw)
        if gguf_file:  # de-quantized on load: train it as the float model it now is
            model = plain_float(model)
        return cls(model, tok, system_prompt, max_new_tokens, base={"ref": ref, "gguf_file": gguf_file, "qlora": qlora})

    @classmethod
    def from_teacher(cls, teacher_model, tokenizer, keep_every: float = 2, *, drop: str = "interleaved",
                     system_prompt: str = "", max_new_tokens: int = 128) -> "CausalLMStudent":
        """Layer-dropped copy of a local teacher (:func:`init_from_teacher`); shares its tokenizer."""
        return cls(init_from_teacher(teacher_model, keep_every, drop=drop), copy.deepcopy(tokenizer), system_prompt,
                   max_new_tokens)

    def messages(self, text: str) -> list[dict]:
        if self.max_input_tokens is not None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) > self.max_input_tokens:
                text = self.tokenizer.decode(ids[: self.max_input_tokens])
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys + [{"role": "user", "content": text}]

    # -- training ------------------------------------------------------------------------------
    def build_rows(self, inputs: Sequence[str], outputs: Sequence[str], *, kd: str, max_length: int,
                   teacher_tokenizer=None, teacher_messages: Sequence[list[dict]] | None = None,
                   topk: Sequence[dict | None] | None = None,
                   sample_weight: Sequence[float] | None = None) -> tuple[list[dict], dict]:
        """Tokenised training rows (+ teacher / top-k / weight columns) and counts of what was dropped and why."""
        rows, stats = [], {"too_long": 0, "no_kd": 0}
        for i, (x, y) in enumerate(zip(inputs, outputs)):
            ids, cmask = encode_example(self.tokenizer, self.messages(x), y)
            if len(ids) > max_length:
                stats["too_long"] += 1
                continue
            row = {"input_ids": ids, "completion_mask": cmask}
            if sample_weight is not None:
                row["sample_weight"] = float(sample_weight[i])
            if kd == "logits":
                t_msgs = teacher_messages[i] if teacher_messages is not None else self.messages(x)
                t_ids, t_mask = encode_example(teacher_tokenizer, t_msgs, y)
                s_toks = self.tokenizer.convert_ids_to_tokens([t for t, m in zip(ids, cmask) if m])
                t_toks = teacher_tokenizer.convert_ids_to_tokens([t for t, m in zip(t_ids, t_mask) if m])
                if s_toks != t_toks:
                    raise TokenizerMismatch(
                        f"item {i}: the teacher tokenises the answer as {t_toks[:8]}... and the student as "
                        f"{s_toks[:8]}...: the token positions do not line up, so no mapping exists. Use a student "
                        f"with the teacher's tokenizer and chat template, or student.kd: none (SFT only).")
                row.update(teacher_input_ids=t_ids, teacher_completion_mask=t_mask)
            elif kd == "topk":
                t = topk[i] if topk is not None else None
                if t is not None and "content" in t:
                    t = topk_from_openai(self.tokenizer, t["content"])
                completion = [tid for tid, m in zip(ids, cmask) if m]
                if t is None or completion[: len(t["token_ids"])] != list(t["token_ids"]):
                    stats["no_kd"] += 1
                    row.update(topk_ids=[], topk_logprobs=[])
                else:
                    row.update(topk_ids=t["ids"], topk_logprobs=t["logprobs"])
            rows.append(row)
        if kd == "topk" and rows and stats["no_kd"] > len(rows) / 2:
            raise TokenizerMismatch(
                f"{stats['no_kd']} of {len(rows)} items' stored top-k tokens do not line up with the student's "
                f"tokenisation of the same answer: the teacher's tokenizer differs and no mapping exists. Use a "
                f"student from the teacher's family, or student.kd: none (SFT only).")
        if not rows:
            raise ValueError(f"no training item fits in max_length={max_length} tokens; raise student.max_length")
        return rows, stats

    def fit(self, inputs: Sequence[str], outputs: Sequence[str], *, teacher=None, teacher_tokenizer=None,
            teacher_messages: Sequence[list[dict]] | None = None, topk: Sequence[dict | None] | None = None,
            kd: str = "auto", alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
            epochs: float = 2.0, lr: float | None = None, batch_size: int = 8, grad_accum: int = 1,
            weight_decay: float = 0.0, warmup: float = 0.05, max_length: int = 512, lora=None, seed: int = 0,
            max_steps: int = -1, output_dir: str | Path | None = None,
            sample_weight: Sequence[float] | None = None, group_by_length: bool = True,
            checkpointing: bool = False) -> "CausalLMStudent":
        """SFT on (input, teacher output) pairs, plus token KD when the teacher's distributions exist.

        ``kd="auto"`` picks "logits" with a ``teacher`` model, "topk" with stored ``topk`` rows, else
        "none". ``alpha`` weighs KD against cross-entropy. ``lora``: a ``LoraSettings``-like object
        (``r, alpha, dropout, target_modules``) or None for a full fine-tune. ``sample_weight``: one weight
        per pair, multiplying its tokens' loss (real labelled data above teacher answers). ``group_by_length``:
        batches of similar lengths (transformers' ``LengthGroupedSampler``), so less of each step is padding.
        ``checkpointing``: activation checkpointing, which TRL turns on by default — it recomputes the forward
        pass during backward (~1/3 more compute) to save memory a small student on a CPU does not need.
        """
        import torch
        from datasets import Dataset
        from trl import SFTConfig

        from protege.students.distributed import multi_process_cpu, work_dir
        from protege.students.kd_trainer import TokenKDCollator, TokenKDTrainer, quiet_trainer, refuse_sharded_lora, trained_model

        from protege.students.drafts import ValueMemory

        self.memory = ValueMemory.from_pairs(inputs, outputs)  # empty unless the answers are JSON objects
        if kd == "auto":
            kd = "logits" if teacher is not None else ("topk" if topk is not None else "none")
        vmap = None
        if kd == "logits":
            if teacher is None:
                raise ValueError("kd='logits' needs the teacher model")
            teacher_tokenizer = teacher_tokenizer or self.tokenizer
            vmap = vocab_map(self.tokenizer, teacher_tokenizer)
        rows, self.data_stats = self.build_rows(inputs, outputs, kd=kd, max_length=max_length,
                                                teacher_tokenizer=teacher_tokenizer, teacher_messages=teacher_messages,
                                                topk=topk, sample_weight=sample_weight)
        peft_config = None
        if lora is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=lora.target_modules, task_type="CAUSAL_LM")
        lr = lr or (2e-4 if lora is not None else 5e-5)
        steps = max(1, -(-len(rows) // (batch_size * grad_accum)))
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        with work_dir("protege-lm-", output_dir) as out_dir:
            args = SFTConfig(
                output_dir=out_dir, num_train_epochs=epochs, max_steps=max_steps,
                per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                learning_rate=lr, weight_decay=weight_decay, warmup_steps=warmup, lr_scheduler_type="cosine",
                logging_steps=max(1, steps // 4), save_strategy="no", eval_strategy="no", report_to="none",
                disable_tqdm=True, remove_unused_columns=False, completion_only_loss=True, max_length=None, seed=seed,
                data_seed=seed, bf16=bf16, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
                use_cpu=multi_process_cpu(),
                train_sampling_strategy="group_by_length" if group_by_length else "random",
                activation_checkpointing=checkpointing)
            t_pad = None if teacher_tokenizer is None else \
                (teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None
                 else teacher_tokenizer.eos_token_id)
            from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

            bars = is_progress_bar_enabled()
            disable_progress_bar()  # SFTTrainer's dataset preparation: instant here, one bar per map otherwise
            try:
                trainer = TokenKDTrainer(
                    model=self.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=self.tokenizer,
                    data_collator=TokenKDCollator(self.tokenizer.pad_token_id, t_pad), peft_config=peft_config,
                    teacher_model=teacher if kd == "logits" else None, alpha=alpha, beta=beta, temperature=temperature,
                    kd=kd, vocab_size=len(self.tokenizer), vocab_map=vmap)
            finally:
                if bars:
                    enable_progress_bar()
            quiet_trainer(trainer, f"student: SFT{'' if kd == 'none' else ' + token KD (' + kd + ')'}")
            if peft_config is not None:
                refuse_sharded_lora(trainer)
            trainer.train()
            from transformers import AutoModelForCausalLM

            self.model = trained_model(trainer, AutoModelForCausalLM).eval()
        self.history = [dict(h) for h in trainer.state.log_history]
        self.kd = kd
        return self

    # -- inference -----------------------------------------------------------------------------
    def generate(self, texts: Sequence[str], *, max_new_tokens: int | None = None, batch_size: int = 8,
                 description: str | None = None, reference: bool = False) -> list[dict]:
        """Greedy answers: through the fast runtime when one is attached (schema-constrained where it can be),
        else — or with ``reference=True`` — transformers' ``generate``, the reference the fast path is checked on."""
        limit = max_new_tokens or self.max_new_tokens
        if self.fast is None or reference:
            prompts = [render(self.tokenizer, self.messages(t)) for t in texts]
            return decode(self.model, self.tokenizer, prompts, max_new_tokens=limit, batch_size=batch_size,
                          description=description)
        from protege.progress import bar

        ids = [self.prompt_ids(t) for t in texts]
        static = self.static_prefix() if self.fields else ()
        out: list[dict] = []
        with bar(description or "decode", len(ids) if description else 0) as advance:
            for i in range(0, len(ids), batch_size):
                chunk = ids[i: i + batch_size]
                out += (self.fast.decode_fields(chunk, self.fields, limit, static=static) if self.fields
                        else self.fast.decode(chunk, limit))
                advance(len(chunk))
        return out

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(render(self.tokenizer, self.messages(text)), add_special_tokens=False).input_ids

    def static_prefix(self) -> list[int]:
        """The prompt tokens every input shares (system prompt and schema): cached once by the fast runtime."""
        if getattr(self, "_static", None) is None:
            self._static = common_prefix([self.prompt_ids("a"), self.prompt_ids("zq")])
        return self._static

    def attach_fast(self, folder: str | Path) -> None:
        """Use the runtime this student was saved with (``student.runtime``) for ``generate``; None = transformers."""
        from protege.students.fast_lm import fast_decoder

        self.fast = fast_decoder(folder, self.tokenizer, self.runtime, self.compute_type)
        if self.memory is not None and hasattr(self.fast, "memory"):
            self.fast.memory = self.memory

    def predict(self, texts: Sequence[str], **kw) -> list[str | None]:
        """Answers; for a classify task (``labels`` set) mapped onto the label set (None if not a label)."""
        answers = [d["text"] for d in self.generate(texts, **kw)]
        if self.labels is None:
            return answers
        from protege.teachers.prompts import parse_label

        return [parse_label(a, self.labels) for a in answers]

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    # -- persistence ---------------------------------------------------------------------------
    def merged_model(self):
        """The model with LoRA adapters folded in (QLoRA: into a 16-bit reload of the base)."""
        from peft import PeftModel

        model = self.model
        if not isinstance(model, PeftModel):
            return model
        if self.base.get("qlora"):
            import torch

            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                base = CausalLMStudent.from_base(self.base["ref"], self.base.get("gguf_file"), dtype="bfloat16").model
                model = PeftModel.from_pretrained(base, d, torch_dtype=torch.bfloat16)
        return model.merge_and_unload()

    def save_pretrained(self, path: str | Path) -> None:
        """A plain HF causal-LM folder (adapters merged) + tokenizer; the prompt settings in config.json."""
        from protege import __version__

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        model = self.merged_model()
        self.model = model
        model.config.protege_student = "causal_lm"
        model.config.protege_system_prompt = self.system_prompt
        model.config.protege_max_new_tokens = self.max_new_tokens
        model.config.protege_labels = self.labels
        model.config.protege_max_input_tokens = self.max_input_tokens
        model.config.protege_version = __version__
        model.config.protege_runtime, model.config.protege_compute_type = self.runtime, self.compute_type
        model.config.protege_fields = self.fields
        model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)
        if self.memory is not None and self.memory.values:
            (p / "value_memory.json").write_text(json.dumps(self.memory.to_json()), encoding="utf-8")
        else:
            (p / "value_memory.json").unlink(missing_ok=True)  # not an older training run's
        from protege.students.fast_lm import convert_for

        convert_for(p, self.runtime, self.compute_type)  # exported with the student: no conversion on first request

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CausalLMStudent":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        student = cls(model, tok, cfg.get("protege_system_prompt", ""), int(cfg.get("protege_max_new_tokens", 128)))
        student.labels, student.max_input_tokens = cfg.get("protege_labels"), cfg.get("protege_max_input_tokens")
        student.runtime = cfg.get("protege_runtime", "transformers")
        student.compute_type, student.fields = cfg.get("protege_compute_type", "float32"), cfg.get("protege_fields")
        if (p / "value_memory.json").is_file():
            from protege.students.drafts import ValueMemory

            student.memory = ValueMemory.from_json(json.loads((p / "value_memory.json").read_text(encoding="utf-8")))
        student.attach_fast(p)
        return student


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix all ``seqs`` share, less one token (a prompt must keep at least one of its own)."""
    if not seqs:
        return []
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return list(seqs[0][: max(0, min(k, n - 1))])
