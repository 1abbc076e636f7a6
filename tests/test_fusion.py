"""Label fusion rules (seed 001, seed 003, seed 004) on small hand-made label arrays."""

import json

import numpy as np
import pytest

from abdoseg.label_fusion.rules import (
    RULES,
    apply_rule,
    fill_from_prediction,
    fuse_labeled,
    fuse_organs,
    fuse_unlabeled,
    majority_lesion,
    supplement_weak_label,
    fusion_report,
)

# One column per voxel: (A, B, partial) -> expected fused label (paper rule), with the reason.
LABELED_CASES = [
    (0, 0, 0, 0),    # nothing anywhere
    (1, 1, 0, 1),    # A and B agree
    (1, 0, 0, 1),    # union: only A
    (0, 3, 0, 3),    # union: only B
    (1, 3, 1, 1),    # A != B, partial sides with A
    (1, 3, 3, 3),    # A != B, partial sides with B
    (1, 3, 0, 0),    # A != B, partial background: all three differ -> background
    (1, 3, 4, 0),    # A != B, partial a third organ -> background
    (1, 3, 14, 14),  # conflict, but the partial lesion is overlaid last
    (1, 1, 14, 14),  # lesion overlaid over an agreed organ
    (0, 0, 14, 14),  # lesion overlaid over background
    (0, 0, 2, 0),    # annotated organ outside A and B: paper keeps A/B's background
    (3, 3, 2, 3),    # annotated organ where A and B agree on another organ: paper follows A/B
    (2, 2, 0, 2),    # A and B say 2, partial (2 annotated) says no: paper follows A/B
]


def _columns(cases):
    arr = np.array(cases, dtype=np.uint8).T
    return [arr[i] for i in range(arr.shape[0])]


def test_fuse_labeled_follows_seed003_voxel_by_voxel():
    a, b, p, expected = _columns(LABELED_CASES)
    before = (a.copy(), b.copy(), p.copy())
    out = fuse_labeled(p, a, b, annotated_classes=[1, 2, 3, 4, 14])
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    # inputs untouched
    for x, y in zip((a, b, p), before):
        np.testing.assert_array_equal(x, y)


def test_fuse_labeled_keep_annotated_extension():
    a, b, p, expected = _columns(LABELED_CASES)
    out = fuse_labeled(p, a, b, annotated_classes=[1, 2, 3, 4, 14], keep_annotated=True)
    exp = expected.copy()
    exp[11] = 2  # annotated organ kept
    exp[12] = 2
    exp[13] = 0  # organ 2 is annotated and the partial label says "not 2"
    # voxel 4/5: annotated organs 1 and 3 already match; voxel 7: partial says 4 -> kept as 4
    exp[7] = 4
    # voxel 1 (A=B=1, partial 0, class 1 annotated): partial says not liver -> background
    exp[1] = 0
    exp[2] = 0  # only A says 1, partial (1 annotated) says background
    exp[3] = 0  # only B says 3, 3 annotated, partial background
    np.testing.assert_array_equal(out, exp)


def test_fuse_labeled_works_on_3d_arrays_and_any_shape():
    a, b, p, expected = _columns(LABELED_CASES)
    shape = (2, 7)
    out = fuse_labeled(p.reshape(shape), a.reshape(shape), b.reshape(shape))
    np.testing.assert_array_equal(out, expected.reshape(shape))
    vol = np.zeros((3, 4, 5), np.uint8)
    vol[1, 1:3, 2:4] = 6
    np.testing.assert_array_equal(fuse_labeled(np.zeros_like(vol), vol, vol), vol)


def test_fuse_labeled_rejects_inconsistent_inputs():
    a, b, p, _ = _columns(LABELED_CASES)
    with pytest.raises(ValueError, match="not in annotated_classes"):
        fuse_labeled(p, a, b, annotated_classes=[1, 3])
    with pytest.raises(ValueError, match="differ in shape"):
        fuse_labeled(p[:-1], a, b)
    with pytest.raises(ValueError, match="pseudo_a"):
        fuse_labeled(p, np.full_like(a, 14), b)
    with pytest.raises(ValueError, match="0..14"):
        fuse_labeled(p, a, np.full_like(b, 20))


def test_fuse_unlabeled_uses_s1_as_referee_and_votes_lesion():
    #            A  B  S1 S2 S3 expected
    cases = [
        (1, 3, 1, 0, 0, 1),     # S1 sides with A
        (1, 3, 3, 0, 0, 3),     # S1 sides with B
        (1, 3, 5, 0, 0, 0),     # all differ
        (0, 4, 0, 0, 0, 4),     # union
        (2, 2, 14, 14, 0, 14),  # 2 of 3 lesion -> lesion
        (2, 2, 14, 0, 0, 2),    # 1 of 3 lesion -> organ stays
        (0, 0, 0, 14, 14, 14),  # S2+S3 outvote S1
        (1, 3, 14, 14, 14, 14),  # conflict with S1 lesion: organs 0, lesion by vote
    ]
    a, b, s1, s2, s3, expected = _columns(cases)
    out = fuse_unlabeled(s1, a, b, lesion_votes=(s1, s2, s3))
    np.testing.assert_array_equal(out, expected)
    # S1 alone decides the lesion when no other votes are given
    out1 = fuse_unlabeled(s1, a, b)
    np.testing.assert_array_equal(out1 == 14, s1 == 14)


def test_majority_lesion_is_strict_majority():
    v = [np.array([14, 14, 0, 0]), np.array([14, 0, 14, 0]), np.array([0, 0, 0, 14])]
    np.testing.assert_array_equal(majority_lesion(v), [True, False, False, False])
    np.testing.assert_array_equal(majority_lesion(v[:2]), [True, False, False, False])  # 1 of 2 is no majority
    with pytest.raises(ValueError):
        majority_lesion([])


def test_fuse_organs_never_outputs_lesion():
    a = np.array([1, 2, 0])
    b = np.array([2, 1, 0])
    r = np.array([14, 14, 14])
    np.testing.assert_array_equal(fuse_organs(a, b, r), [0, 0, 0])


def test_supplement_weak_label_seed004():
    #            partial teacher expected
    cases = [
        (0, 0, 0),
        (0, 2, 2),     # unannotated organ 2 filled into background
        (1, 2, 1),     # annotated voxel never changed
        (0, 1, 0),     # teacher's liver discarded: liver is annotated
        (14, 3, 14),   # lesion voxel kept
        (0, 14, 0),    # lesion never pseudo-labeled
        (1, 1, 1),
        (0, 13, 13),
    ]
    p, t, expected = _columns(cases)
    out = supplement_weak_label(p, t, annotated_classes=[1, 14])
    np.testing.assert_array_equal(out, expected)
    # paper criterion (classes appearing in the label) gives the same here
    np.testing.assert_array_equal(supplement_weak_label(p, t), expected)


def test_supplement_respects_annotated_but_absent_class():
    p = np.array([0, 0, 1], np.uint8)
    t = np.array([9, 9, 1], np.uint8)
    # gallbladder (9) annotated but absent (e.g. removed): not filled
    np.testing.assert_array_equal(supplement_weak_label(p, t, annotated_classes=[1, 9]), [0, 0, 1])
    # by the paper's "appears in the label" criterion it is filled
    np.testing.assert_array_equal(supplement_weak_label(p, t), [9, 9, 1])


def test_fusion_report_counts_and_is_json_ready():
    before = np.array([0, 0, 1, 1, 2, 14], np.uint8)
    after = np.array([0, 3, 1, 2, 2, 14], np.uint8)
    rep = fusion_report(before, after)
    json.dumps(rep)
    assert rep["total_voxels"] == 6 and rep["changed_voxels"] == 2
    assert rep["changed_fraction"] == pytest.approx(2 / 6)
    assert rep["classes"]["spleen"] == {"id": 3, "before": 0, "after": 1, "gained": 1, "lost": 0}
    assert rep["classes"]["liver"] == {"id": 1, "before": 2, "after": 1, "gained": 0, "lost": 1}
    assert rep["classes"]["right_kidney"] == {"id": 2, "before": 1, "after": 2, "gained": 1, "lost": 0}
    assert rep["classes"]["background"]["lost"] == 1
    assert rep["classes"]["lesion"]["gained"] == 0


def test_apply_rule_dispatch():
    a, b, p, expected = _columns(LABELED_CASES)
    np.testing.assert_array_equal(apply_rule("seed003", partial=p, pseudo_a=a, pseudo_b=b), expected)
    np.testing.assert_array_equal(
        apply_rule("seed003", s1=p, pseudo_a=a, pseudo_b=b, lesion_votes=[p, p, a]),
        fuse_unlabeled(p, a, b, lesion_votes=[p, p, a]),
    )
    np.testing.assert_array_equal(
        apply_rule("seed004", partial=p, teacher=a, annotated_classes=[1, 2, 3, 4, 14]),
        supplement_weak_label(p, a, [1, 2, 3, 4, 14]),
    )
    with pytest.raises(ValueError, match="unknown fusion rule"):
        apply_rule("nope", partial=p)
    with pytest.raises(ValueError, match="seed003"):
        apply_rule("seed003", pseudo_a=a, pseudo_b=b)
    with pytest.raises(ValueError, match="seed004"):
        apply_rule("seed004", partial=p)


# ------------------------------------------------------------------ seed 001 round rule
# One column per voxel: (partial, prediction) -> filled label for a case annotating liver (1)
# and spleen (3) only (lesion 14 not annotated).
SEED001_ANNOTATED = [1, 3]
SEED001_CASES = [
    (0, 0, 0),     # background everywhere
    (1, 1, 1),     # annotated, prediction agrees
    (1, 2, 1),     # annotated voxel never changes
    (3, 14, 3),    # annotated voxel never changes, even for a predicted lesion
    (0, 2, 2),     # unannotated organ filled
    (0, 13, 13),   # unannotated organ filled
    (0, 14, 14),   # unannotated lesion filled (unlike seed 004)
    (0, 1, 0),     # prediction of an annotated class outside its mask: discarded
    (0, 3, 0),     # same for the other annotated class
]


def test_fill_from_prediction_seed001_voxel_by_voxel():
    p, t, expected = _columns(SEED001_CASES)
    out = fill_from_prediction(p, t, SEED001_ANNOTATED)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == p.dtype and p[4] == 0  # input untouched
    # with the lesion annotated (absent in this case): the predicted lesion is discarded
    out14 = fill_from_prediction(p, t, SEED001_ANNOTATED + [14])
    assert out14[6] == 0 and np.array_equal(np.delete(out14, 6), np.delete(expected, 6))
    # seed 004 differs exactly on the lesion voxel
    s4 = supplement_weak_label(p, t, SEED001_ANNOTATED)
    assert np.flatnonzero(s4 != out).tolist() == [6]


def test_fill_from_prediction_presence_fallback_unlabeled_and_errors():
    p, t, expected = _columns(SEED001_CASES)
    # annotated_classes None: the classes present in the partial label (1, 3) -> same as above
    np.testing.assert_array_equal(fill_from_prediction(p, t), expected)
    # unlabeled case: the prediction is the label
    vol = np.arange(24).reshape(2, 3, 4) % 15
    unl = fill_from_prediction(None, vol.astype(np.int16))
    np.testing.assert_array_equal(unl, vol)
    assert unl.dtype == np.int16
    with pytest.raises(ValueError, match="not in annotated_classes"):
        fill_from_prediction(p, t, [1])  # partial holds 3
    with pytest.raises(ValueError, match="shape"):
        fill_from_prediction(p, t[:-1], SEED001_ANNOTATED)
    with pytest.raises(ValueError, match="0..14"):
        fill_from_prediction(p, np.full_like(t, 15), SEED001_ANNOTATED)


def test_apply_rule_seed001():
    p, t, expected = _columns(SEED001_CASES)
    assert "seed001" in RULES
    np.testing.assert_array_equal(apply_rule("seed001", partial=p, prediction=t, annotated_classes=SEED001_ANNOTATED),
                                  expected)
    np.testing.assert_array_equal(apply_rule("seed001", prediction=t), t)
    with pytest.raises(ValueError, match="seed001"):
        apply_rule("seed001", partial=p)
