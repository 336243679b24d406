"""Students: found by ``student.kind`` in the task file, or by the folder a trained one was saved to.

=========  =========================================  ==================================================
kind       class                                      what it is
=========  =========================================  ==================================================
static     ``classifier.StaticClassifier``            static token embeddings + n-grams, linear head; < 1 ms
encoder    ``encoder.EncoderClassifier``              a small transformer encoder (MiniLM) fine-tuned;
                                                      runs as int8 ONNX (~2-4 ms on short text)
causal_lm  ``causal_lm.CausalLMStudent``              a small chat LM (SFT + token KD, LoRA), servable by
                                                      Ollama / vLLM
=========  =========================================  ==================================================

Kinds live in :mod:`protege.registry` (third-party students register by entry point). Every saved student
folder has a ``config.json`` naming its kind (``protege_student``), so :func:`load_student` needs nothing
but the path. Imports are lazy: the static student must not pay for importing transformers / TRL.
"""

from protege.registry import load_student, student_class

__all__ = ["load_student", "student_class"]
