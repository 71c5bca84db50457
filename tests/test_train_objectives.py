"""The three objectives on packed batches: MLM statistics, CLM without cross-document targets, MNTP shift."""

import numpy as np
import pytest

from twinlm.train.objectives import CLM, MLM, MNTP, token_uniforms

SPECIALS = (1, 2, 3, 4, 0)  # cls, sep, pad, mask, unk
MASK = 4


def packed(n_docs=50, length=400, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[1], rng.integers(5, vocab, size=length - 2), [2]]) for _ in range(n_docs)]
    cu = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int32)
    return np.concatenate(docs).astype(np.int64), cu, list(range(100, 100 + n_docs))


@pytest.mark.parametrize("ratio", [0.30, 0.15])
def test_mlm_masking_statistics(ratio):
    ids, cu, sids = packed()
    obj = MLM(seed=21, mask_ratio=ratio, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    p = obj.prepare(ids, cu, sids)
    pos = p.positions.numpy()
    maskable = ~np.isin(ids, SPECIALS)
    assert np.isin(ids[pos], SPECIALS).sum() == 0  # never on [CLS]/[SEP]
    frac = len(pos) / maskable.sum()
    assert abs(frac - ratio) < 0.01
    new = p.input_ids.numpy()[pos]
    is_mask = new == MASK
    unchanged = new == ids[pos]
    random = ~is_mask & ~unchanged
    n = len(pos)
    assert abs(is_mask.mean() - 0.8) < 0.015
    # a random draw equal to the original counts as unchanged: ~0.1% at this vocabulary
    assert abs(unchanged.mean() - 0.1) < 0.012 and abs(random.mean() - 0.1) < 0.012, (n, unchanged.mean())
    assert (p.targets.numpy() == ids[pos]).all()
    # positions not chosen keep their token
    rest = np.setdiff1d(np.arange(len(ids)), pos)
    assert (p.input_ids.numpy()[rest] == ids[rest]).all()


def test_masking_depends_on_the_sample_not_the_batch():
    ids, cu, sids = packed(n_docs=6, length=50)
    obj = MLM(seed=3, mask_ratio=0.3, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    whole = obj.prepare(ids, cu, sids)
    # the 4th document alone (as another rank or micro-batch would see it)
    a, b = cu[3], cu[4]
    alone = obj.prepare(ids[a:b], np.array([0, b - a], dtype=np.int32), [sids[3]])
    sel = whole.positions.numpy()
    sel = sel[(sel >= a) & (sel < b)] - a
    assert sel.tolist() == alone.positions.tolist()
    assert (whole.input_ids.numpy()[a:b] == alone.input_ids.numpy()).all()
    # another seed masks differently
    other = MLM(seed=4, mask_ratio=0.3, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    assert other.prepare(ids, cu, sids).positions.tolist() != whole.positions.tolist()


def test_uniforms_are_uniform_and_independent():
    u = token_uniforms(1, np.zeros(100000, dtype=np.int64), np.arange(100000), 0)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    v = token_uniforms(1, np.zeros(100000, dtype=np.int64), np.arange(100000), 1)
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.02


def test_clm_has_no_cross_document_targets():
    ids, cu, sids = packed(n_docs=5, length=20)
    p = CLM(seed=0).prepare(ids, cu, sids, salt=5)
    pos, tgt = p.positions.numpy(), p.targets.numpy()
    assert (p.input_ids.numpy() == ids).all()
    last = cu[1:] - 1
    assert not np.isin(last, pos).any()  # a document's last token predicts nothing
    assert (tgt == ids[pos + 1]).all()
    doc = np.searchsorted(cu, pos, side="right")
    assert (doc == np.searchsorted(cu, pos + 1, side="right")).all()  # target in the same document
    assert len(pos) == len(ids) - len(sids)


def test_mntp_predicts_the_masked_token_from_the_previous_position():
    ids, cu, sids = packed(n_docs=20, length=60)
    obj = MNTP(seed=21, mask_ratio=0.15, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    mlm = MLM(seed=21, mask_ratio=0.15, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    p = obj.prepare(ids, cu, sids)
    chosen = p.positions.numpy() + 1  # the masked positions
    assert (p.targets.numpy() == ids[chosen]).all()
    assert not np.isin(cu[:-1], chosen).any()  # never a document's first token
    assert (p.positions.numpy() >= 0).all()
    doc = np.searchsorted(cu, chosen, side="right")
    assert (doc == np.searchsorted(cu, chosen - 1, side="right")).all()
    # same masking draws as MLM (documents start with [CLS], which MLM never masks either)
    m = mlm.prepare(ids, cu, sids)
    assert m.positions.tolist() == chosen.tolist()
    assert (m.input_ids.numpy() == p.input_ids.numpy()).all()
    assert (p.input_ids.numpy()[chosen] == MASK).mean() > 0.7


def test_a_sample_seen_again_in_another_step_gets_a_fresh_mask():
    ids, cu, sids = packed(n_docs=4, length=80)
    obj = MLM(seed=21, mask_ratio=0.3, mask_token_id=MASK, special_ids=SPECIALS, random_high=1000)
    a = obj.prepare(ids, cu, sids, salt=1)
    assert obj.prepare(ids, cu, sids, salt=1).positions.tolist() == a.positions.tolist()
    assert obj.prepare(ids, cu, sids, salt=2).positions.tolist() != a.positions.tolist()
