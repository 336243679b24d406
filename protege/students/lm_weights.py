"""Causal-LM students, weight side: a smaller student made from the teacher by dropping layers (DistilBERT-style
interleaved, or one middle block), de-quantized GGUF weights made trainable, and whether QLoRA can run here."""

from __future__ import annotations

import copy
import math
import re
from typing import Sequence


_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<i>\d+)\.(?P<rest>.+)$")


def kept_layers(n: int, keep_every: float = 2, drop: str = "interleaved") -> list[int]:
    """Which of ``n`` teacher layers a student keeps: ``ceil(n / keep_every)`` of them (1.5: 20 of 30).

    ``interleaved``: ``0, k, 2k, ...`` (DistilBERT). ``middle``: the first and last layers, dropping one
    contiguous block from the middle — deep models tolerate losing a middle block far better than losing
    every other layer (Gromov et al. 2024; Men et al. 2024, "ShortGPT"). Measured on SmolLM2-135M (30
    layers) answering invoice prompts, cross-entropy of the teacher's own answers before any training:
    teacher 0.31; 15 layers interleaved 12.96, middle dropped 8.16; 20 layers middle dropped 4.69.
    """
    m = min(n, max(1, math.ceil(n / keep_every)))
    if drop == "interleaved":
        return sorted({min(n - 1, round(i * keep_every)) for i in range(m)})
    if drop == "middle":
        head = -(-m // 2)
        return list(range(head)) + list(range(n - (m - head), n))
    raise ValueError(f"drop must be 'interleaved' or 'middle', got {drop!r}")


def init_from_teacher(teacher, keep_every: float = 2, keep: Sequence[int] | None = None, drop: str = "interleaved"):
    """A shallower copy of ``teacher``: the layers :func:`kept_layers` picks (or ``keep``), the rest shared.

    DistilBERT's initialisation (Sanh et al. 2019): a student that starts as "every other layer of the
    teacher" keeps its embeddings, output head and part of its function, and recovers with far less
    training than a random init. Works for any HF model whose blocks live in ``*.layers.N`` /
    ``*.layer.N`` / ``*.h.N`` / ``*.blocks.N`` and whose config has ``num_hidden_layers``.
    """
    cfg = copy.deepcopy(teacher.config)
    n = cfg.num_hidden_layers
    keep = kept_layers(n, keep_every, drop) if keep is None else sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers to keep {keep} must lie in 0..{n - 1}")
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    pos = {old: new for new, old in enumerate(keep)}
    state = {}
    for k, v in teacher.state_dict().items():
        m = _LAYER.match(k)
        if m is None:
            state[k] = v
        elif int(m["i"]) in pos:
            state[f"{m['pre']}.{pos[int(m['i'])]}.{m['rest']}"] = v
    student = type(teacher)(cfg)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"layer-dropped copy of {type(teacher).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (unsupported layer naming?)")
    student = student.to(next(teacher.parameters()).dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.config.protege_kept_layers = keep
    return student.eval()


def qlora_problem() -> str | None:
    """Why QLoRA cannot run here (None when it can)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "QLoRA needs a CUDA GPU (4-bit bitsandbytes kernels) and this machine has none"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs bitsandbytes (pip install bitsandbytes)"
    return None


def plain_float(model):
    """Unmark a model loaded from a GGUF file as quantized; returns it.

    transformers de-quantizes GGUF weights into ordinary float tensors on load but keeps the model marked
    as quantized (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``), and the Trainer
    then refuses it ("cannot perform fine-tuning on purely quantized models"; with LoRA "quantized with
    QuantizationMethod.GGUF but that quantization method do not support training"). The weights are
    plain floats: drop the marks, as transformers itself does for ``dequantize=True`` configs.
    """
    from transformers.modeling_utils import PreTrainedModel

    q = getattr(model, "hf_quantizer", None)
    if q is not None:
        q.remove_quantization_config(model)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            for obj, attr in ((m, "hf_quantizer"), (m, "quantization_method"), (m.config, "quantization_config")):
                if attr in vars(obj):
                    delattr(obj, attr)
            if getattr(m, "is_quantized", False):
                m.is_quantized = False
            if getattr(m.config, "_is_quantized", False):
                m.config._is_quantized = False
    return model
