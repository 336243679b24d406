"""Causal-LM students to GGUF (llama.cpp, Ollama) with llama.cpp's own converter, verified by loading back.

The converter is ``convert_hf_to_gguf.py`` (+ its ``conversion/`` package and ``gguf-py``), taken from the
``llama-cpp-python`` source distribution on PyPI, which vendors llama.cpp: ``pip download --no-deps
--no-binary :all: llama-cpp-python`` (the sdist is never built — that is an ~8 minute compile — only
unpacked) and run in place. Both the sdist and the unpacked converter are cached under
``$PROTEGE_CACHE`` (default ``~/.cache/protege``), so only the first export touches PyPI.

Verification: the GGUF is loaded back with transformers (``gguf_file=``, the same reader Ollama's
llama.cpp core mirrors), its own tokenizer and chat template render the student's prompt for a sample
of inputs, and both models decode greedily: the prompt token ids, the answers and the logits are compared
with the HF student's. ``ollama`` adds a ``Modelfile``: the chat template rendered into Ollama's Go
template syntax (``{{ .System }}`` / ``{{ .Prompt }}``), the student's system prompt, stop tokens and
deterministic decoding parameters.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from protege.data import write_json
from protege.artifacts import atomic_dir
from protege.export.common import cache_root, metadata, model_card, student_dir, student_kind

CONVERTER_PACKAGE = os.environ.get("PROTEGE_LLAMA_CPP_PYTHON", "llama-cpp-python==0.3.36")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


class ConverterUnavailable(RuntimeError):
    """llama.cpp's converter could not be obtained (no PyPI access, no cached sdist)."""


# -- the converter ---------------------------------------------------------------------------------

def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)


def _cached_sdist(folder: Path, spec: str) -> Path | None:
    version = spec.split("==", 1)[1] if "==" in spec else None
    pattern = f"llama_cpp_python-{version}.tar.gz" if version else "llama_cpp_python-*.tar.gz"
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def download_sdist(spec: str = CONVERTER_PACKAGE, folder: Path | None = None, timeout_s: float = 1800) -> Path:
    """The llama-cpp-python sdist, from the cache or PyPI (pip, the ordinary client)."""
    folder = Path(folder or cache_root() / "sdist")
    hit = _cached_sdist(folder, spec)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".dl-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", spec, "-d", str(tmp)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        got = _cached_sdist(tmp, spec)
        if r.returncode != 0 or got is None:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-3:])
            raise ConverterUnavailable(f"could not download {spec} (the sdist that ships llama.cpp's GGUF converter) "
                                       f"with pip: {tail or 'no sdist in the download'}")
        dest = folder / got.name
        os.replace(got, dest)
        return dest
    except subprocess.TimeoutExpired:
        raise ConverterUnavailable(f"pip download {spec} took longer than {timeout_s:.0f} s") from None
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def converter_dir(spec: str = CONVERTER_PACKAGE) -> Path:
    """Folder holding ``convert_hf_to_gguf.py`` ready to run in place (unpacked once, then cached)."""
    root = cache_root() / "llama-cpp-converter" / _slug(spec)
    if (root / "convert_hf_to_gguf.py").is_file() and (root / "conversion").is_dir():
        return root
    sdist = download_sdist(spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-"))
    with tarfile.open(sdist) as tar:
        base = next((m.name.split("/", 1)[0] for m in tar.getmembers()), "")
        prefix = f"{base}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and any(m.name[len(prefix):].startswith(x) for x in _MEMBERS) and (m.isfile() or m.isdir())]
        if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
            raise ConverterUnavailable(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    if root.exists():  # a parallel export won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return root
    os.replace(tmp, root)
    return root


def convert(hf_dir: Path, out_file: Path, outtype: str = "f16", timeout_s: float = 3600) -> Path:
    """Run llama.cpp's converter on a Hugging Face causal-LM folder."""
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    if importlib.util.find_spec("sentencepiece") is None:
        raise ValueError("llama.cpp's converter imports sentencepiece: pip install sentencepiece (or 'protege[export]')")
    script = converter_dir() / "convert_hf_to_gguf.py"
    # absolute: the converter runs in its own folder (cwd=), where a relative run folder does not exist
    hf_dir, out_file = Path(hf_dir).resolve(), Path(out_file).resolve()
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out_file), "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # run with the gguf-py that ships with this converter, not the installed one
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=script.parent, env=env)
    if r.returncode != 0 or not Path(out_file).is_file():
        tail = "\n".join((r.stderr + r.stdout).strip().splitlines()[-6:])
        raise ValueError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir}:\n{tail}")
    return Path(out_file)


# -- checking the result ----------------------------------------------------------------------------

def gguf_field(path: Path, key: str):
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get(key)
    return None if f is None else f.contents()


def verify(hf_dir: Path, gguf_path: Path, texts: Sequence[str], max_new_tokens: int = 24) -> dict:
    """Load the GGUF back with transformers and compare it with the HF student on ``texts``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.students.causal_lm import CausalLMStudent
    from protege.students.lm_tokens import render

    hf = CausalLMStudent.from_pretrained(hf_dir)
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    g_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    g_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    n_new = min(max_new_tokens, hf.max_new_tokens)
    same_ids = same_answers = 0
    max_diff, rows = 0.0, []
    with torch.inference_mode():
        for text in texts:
            msgs = hf.messages(text)
            a_ids = hf.tokenizer(render(hf.tokenizer, msgs), add_special_tokens=False).input_ids
            b_ids = g_tok(render(g_tok, msgs), add_special_tokens=False).input_ids
            same_ids += a_ids == b_ids
            a = _greedy(hf.model, a_ids, n_new, hf.tokenizer.eos_token_id)
            b = _greedy(g_model, b_ids, n_new, g_tok.eos_token_id)
            a_txt = hf.tokenizer.decode(a, skip_special_tokens=True)
            b_txt = g_tok.decode(b, skip_special_tokens=True)
            same_answers += a == b and a_txt == b_txt  # same tokens, and they read the same
            x = torch.tensor([a_ids])
            max_diff = max(max_diff, float((hf.model(x).logits - g_model(x).logits).abs().max()))
            rows.append({"input": text[:80], "hf": a_txt, "gguf": b_txt})
    n = len(texts)
    return {"n": n, "same_prompt_ids": same_ids, "same_answers": same_answers, "agreement": same_answers / n if n else None,
            "max_abs_logit_diff": max_diff, "chat_template_in_gguf": bool(getattr(g_tok, "chat_template", None)),
            "examples": rows[:5]}


def _greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return [t for t in out[0, len(ids):].tolist() if t != eos]


# -- Ollama ------------------------------------------------------------------------------------

_SYS, _USR, _ASST = "\x01PROTEGE_SYSTEM\x01", "\x01PROTEGE_PROMPT\x01", "\x01PROTEGE_ANSWER\x01"


def ollama_template(tok, strip_bos: bool = False) -> tuple[str, list[str], bool]:
    """(Go template, stop strings, system role supported) from the tokenizer's chat template.

    The HF (Jinja) template is rendered once with placeholder messages and the placeholders replaced by
    Ollama's ``{{ .System }}`` / ``{{ .Prompt }}``: exact for the single-turn prompts a task student sees.
    """
    system_ok = True
    try:
        text = tok.apply_chat_template([{"role": "system", "content": _SYS}, {"role": "user", "content": _USR}],
                                       tokenize=False, add_generation_prompt=True)
        if _SYS not in text:
            raise ValueError("template drops the system turn")
        tmpl = text.replace(_SYS, "{{ .System }}").replace(_USR, "{{ .Prompt }}")
    except Exception:
        system_ok = False
        text = tok.apply_chat_template([{"role": "user", "content": _USR}], tokenize=False, add_generation_prompt=True)
        tmpl = text.replace(_USR, "{{ .System }}\n\n{{ .Prompt }}")
    if strip_bos and tok.bos_token and tmpl.startswith(tok.bos_token):
        tmpl = tmpl[len(tok.bos_token):]  # llama.cpp adds BOS itself (add_bos_token in the GGUF)
    stops = []
    try:
        full = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _ASST}],
                                       tokenize=False)
        after = full.split(_ASST, 1)[1].strip()
        specials = sorted(tok.all_special_tokens, key=len, reverse=True)
        first = next((s for s in specials if s and after.startswith(s)), None)
        if first:
            stops.append(first)
    except Exception:
        pass
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    return tmpl, stops, system_ok


def _quote(s: str) -> str:
    return s.replace('"""', '\\"\\"\\"')


def modelfile(gguf_name: str, tok, system_prompt: str, *, max_new_tokens: int, num_ctx: int, task_name: str,
              labels: list[str] | None, add_bos: bool) -> str:
    tmpl, stops, _ = ollama_template(tok, strip_bos=add_bos)
    lines = [f"# protege student for task {task_name!r}. Create and run it with:",
             f"#   ollama create {task_name.lower()} -f Modelfile && ollama run {task_name.lower()} 'your input'"]
    if labels:
        lines.append(f"# Answers with one of: {', '.join(labels)}")
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{_quote(tmpl)}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{_quote(system_prompt)}"""')
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", f"PARAMETER num_predict {max_new_tokens}",
              f"PARAMETER num_ctx {num_ctx}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def render_modelfile_template(text: str, system: str, prompt: str) -> str:
    """Fill a Modelfile's TEMPLATE the way Ollama does for one turn (used to check it against HF)."""
    tmpl = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    return tmpl.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


# -- the export --------------------------------------------------------------------------------

def sample_texts(run: Path, task=None, n: int = 8) -> list[str]:
    from protege.data import read_jsonl

    if task is not None:
        from protege.data import load_gold

        return [g["text"] for g in load_gold(task)][:n]
    p = Path(run) / "curate" / "train.jsonl"
    if p.is_file():
        return [r["text"] for r in read_jsonl(p)][:n]
    return ["Hello!", "What is this about?"]


def export_gguf(run: Path, dest: Path, task=None, *, ollama: bool = False, outtype: str = "f16",
                texts: Sequence[str] | None = None, verify_n: int = 8) -> dict:
    src = student_dir(run)
    kind = student_kind(src)
    if kind != "causal_lm":
        raise ValueError(f"GGUF / Ollama export is for causal-LM students; this run's student is {kind!r}: "
                         f"use --format onnx (or hf)")
    meta = metadata(run, task)
    samples = list(texts) if texts is not None else sample_texts(run, task, verify_n)
    with atomic_dir(dest) as tmp:
        gguf_path = convert(src, tmp / "model.gguf", outtype)
        check = verify(src, gguf_path, samples)
        meta.update(gguf={"file": "model.gguf", "outtype": outtype, "converter": CONVERTER_PACKAGE,
                          "bytes": gguf_path.stat().st_size}, verification=check)
        extra = "Load: `AutoModelForCausalLM.from_pretrained(folder, gguf_file='model.gguf')`, or llama.cpp."
        if ollama:
            import json

            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            scfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
            add_bos = bool(gguf_field(gguf_path, "tokenizer.ggml.add_bos_token"))
            text = modelfile("model.gguf", tok, scfg.get("protege_system_prompt", ""),
                             max_new_tokens=int(scfg.get("protege_max_new_tokens", 128)),
                             num_ctx=int(min(scfg.get("max_position_embeddings", 2048), 8192)),
                             task_name=meta.get("task") or "protege-student", labels=meta.get("labels"), add_bos=add_bos)
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
            meta["ollama"] = {"modelfile": "Modelfile", "add_bos_token": add_bos}
            extra = "Ollama: `ollama create NAME -f Modelfile && ollama run NAME 'input'`. " + extra
        write_json(tmp / "protege.json", meta)
        (tmp / "README.md").write_text(model_card(meta, extra), encoding="utf-8")
    return {"format": "ollama" if ollama else "gguf", "path": str(dest), "outtype": outtype,
            "bytes": (dest / "model.gguf").stat().st_size, "verification": check}
