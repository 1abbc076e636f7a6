"""Marginal + exclusion loss (Shi et al. 2021) and the AnnotatedClassesd transform."""

import math

import pytest
import torch
from monai.data import list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss

from abdoseg.training.losses import (
    MarginalExclusionLoss,
    SigmoidDiceBCELoss,
    labels_to_multichannel,
    marginal_log_probs,
    pack_target,
    sigmoid_logits_to_labels,
)
from abdoseg.data.transforms import AnnotatedClassesd, annotated_mask

C = 5  # background + 4 classes keeps the tensors tiny


def _data(seed=0, b=2, shape=(4, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, C, *shape, generator=g) * 2
    label = torch.zeros(b, 1, *shape, dtype=torch.long)
    label[:, 0, :2, :2, :] = 1
    label[:, 0, 2:, 2:, :2] = 3
    label[1, 0, 0, 3, :] = 4
    return logits, label


def _ann(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_all_annotated_equals_monai_dicece():
    logits, label = _data()
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    loss = MarginalExclusionLoss(num_classes=C)
    assert torch.allclose(loss(logits, label), ref, atol=1e-6)
    assert torch.allclose(loss(logits, label, torch.ones(2, C, dtype=torch.bool)), ref, atol=1e-6)
    t = loss.components(logits, label)
    assert float(t["exclusion_dice"]) == 0.0 and float(t["exclusion_ce"]) == 0.0


def test_marginal_ce_matches_hand_computation():
    logits, label = _data(1)
    ann = _ann([[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]])  # class 2 unannotated in both; 4 in case 0 only
    label[0][label[0] == 4] = 0
    p = torch.softmax(logits, 1)
    merged = [[0, 2, 4], [0, 2]]
    nll = torch.zeros(label.shape)
    for b in range(2):
        bg = p[b, merged[b]].sum(0)
        picked = torch.gather(p[b], 0, label[b]).squeeze(0)
        nll[b, 0] = -torch.where(label[b, 0] == 0, bg, picked).log()
    loss = MarginalExclusionLoss(num_classes=C, lambda_dice=0, lambda_exclusion_dice=0, lambda_exclusion_ce=0)
    assert torch.allclose(loss(logits, label, ann), nll.mean(), atol=1e-6)
    # marginal log-probs: merged channel sums, unannotated channels empty
    q = marginal_log_probs(logits, ann).exp()
    assert torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=1e-6)
    assert float(q[:, 2].abs().max()) == 0.0 and float(q[0, 4].abs().max()) == 0.0


def test_marginal_gradients_inside_merged_set_are_proportional_to_probabilities():
    """The marginal loss sees the merged classes only through logsumexp over M, so
    dL/dz_j / p_j is the same for every j in M (background and unannotated classes), at every
    voxel; annotated channels get ordinary gradients."""
    logits, label = _data(2)
    ann = _ann([[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]])
    label[0][label[0] == 4] = 0
    z = logits.clone().requires_grad_(True)
    loss = MarginalExclusionLoss(num_classes=C, lambda_exclusion_dice=0, lambda_exclusion_ce=0)
    loss(z, label, ann).backward()
    p = torch.softmax(logits, 1)
    r = z.grad / p
    # case 0: M = {0, 2, 4}; case 1: M = {0, 2}
    assert torch.allclose(r[0, 2], r[0, 0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(r[0, 4], r[0, 0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(r[1, 2], r[1, 0], rtol=1e-4, atol=1e-6)
    # class 4 is annotated in case 1: its gradient is not tied to the background's
    assert not torch.allclose(r[1, 4], r[1, 0], rtol=1e-3)
    # permuting logits inside M leaves the marginal loss unchanged
    swapped = logits.clone()
    swapped[:, [0, 2]] = logits[:, [2, 0]]
    assert torch.allclose(loss(swapped, label, ann), loss(logits, label, ann), atol=1e-6)
    # ... but not standard DiceCE, which treats class 2 as wrong where the label says 0
    full = MarginalExclusionLoss(num_classes=C)
    assert not torch.allclose(full(swapped, label), full(logits, label), atol=1e-3)


def test_exclusion_ce_gradient_is_zero_outside_annotated_organs():
    logits, label = _data(3)
    ann = _ann([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
    z = logits.clone().requires_grad_(True)
    loss = MarginalExclusionLoss(num_classes=C, lambda_ce=0, lambda_dice=0, lambda_exclusion_dice=0)
    loss(z, label, ann).backward()
    bg = (label == 0).expand_as(z)
    assert float(z.grad[bg].abs().max()) == 0.0
    # inside annotated organs it pushes the unannotated class down (positive gradient on z_2)
    organ = label[:, 0] > 0
    assert bool((z.grad[:, 2][organ] > 0).all())


def test_exclusion_decreases_when_overlap_with_annotated_organs_is_removed():
    _, label = _data()
    ann = _ann([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])  # class 2 unannotated
    base = torch.zeros(2, C, *label.shape[2:])
    organ = (label[:, 0] > 0)
    overlap = base.clone()
    overlap[:, 2][organ] = 6.0  # predicts class 2 on top of annotated organs
    half = base.clone()
    half[:, 2][organ & (torch.arange(4).view(1, 4, 1, 1) < 1)] = 6.0
    apart = base.clone()
    apart[:, 2][~organ] = 6.0  # predicts class 2 only where the label is (merged) background
    apart.scatter_(1, label, torch.where(label > 0, 8.0, 0.0))  # and the annotated organs as such
    loss = MarginalExclusionLoss(num_classes=C)
    comps = [loss.components(x, label, ann) for x in (overlap, half, apart)]
    for key in ("exclusion_dice", "exclusion_ce"):
        v = [float(c[key]) for c in comps]
        assert v[0] > v[1] > v[2], (key, v)
    assert float(comps[2]["exclusion_dice"]) < 0.05 * float(comps[0]["exclusion_dice"])
    # the marginal terms cannot see the "apart" prediction: class 2 there is merged background
    assert float(comps[2]["marginal_ce"]) < float(comps[0]["marginal_ce"])


def test_finite_with_empty_classes_and_extreme_logits():
    logits, label = _data(4)
    loss = MarginalExclusionLoss(num_classes=C)
    empty = torch.zeros_like(label)
    for lab, ann in (
        (empty, _ann([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])),  # nothing annotated, empty label
        (empty, _ann([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])),  # annotated but absent classes
        (label, _ann([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])),
    ):
        for scale in (1.0, 100.0):
            z = (logits * scale).requires_grad_(True)
            out = loss(z, lab, ann)
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    # exclusion is exactly 0 when there is no annotated organ to exclude
    t = loss.components(logits, empty, _ann([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]))
    assert float(t["exclusion_dice"]) == 0.0 and float(t["exclusion_ce"]) == 0.0


def test_deep_supervision_list_stack_and_packed_target():
    logits, label = _data(5, shape=(8, 8, 4))
    ann = _ann([[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]])
    label[0][label[0] == 4] = 0
    low = torch.nn.functional.avg_pool3d(logits, 2)
    loss = MarginalExclusionLoss(num_classes=C)
    low_label = torch.nn.functional.interpolate(label.float(), size=low.shape[2:], mode="nearest-exact").long()
    expected = loss(logits, label, ann) + 0.5 * loss(low, low_label, ann)
    assert torch.allclose(loss([logits, low], label, ann), expected, atol=1e-6)
    # DynUNet training output: (B, L, C, *S) at full resolution
    stack = torch.stack([logits, logits * 0.5], dim=1)
    assert torch.allclose(loss(stack, label, ann), loss(logits, label, ann) + 0.5 * loss(logits * 0.5, label, ann), atol=1e-6)
    # packed target: works through two-argument callers such as MONAI DeepSupervisionLoss
    packed = pack_target(label, ann)
    assert torch.allclose(loss(logits, packed), loss(logits, label, ann), atol=1e-6)
    wrapped = DeepSupervisionLoss(loss, weight_mode="exp")
    assert torch.allclose(wrapped([logits, low], packed), expected, atol=1e-6)


def test_errors():
    logits, label = _data()
    loss = MarginalExclusionLoss(num_classes=C)
    with pytest.raises(ValueError, match="class 4, which is not flagged annotated"):
        loss(logits, label, _ann([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="logits must have shape"):
        loss(logits[:, :3], label)
    with pytest.raises(ValueError, match="0..4"):
        loss(logits, label + 5)
    with pytest.raises(ValueError, match="annotated must have shape"):
        loss(logits, label, torch.ones(2, 3, dtype=torch.bool))


def test_annotated_classes_transform_and_collate():
    t = AnnotatedClassesd(num_classes=C)
    a = t({"image": "x", "annotated_classes": [1, 3]})
    b = t({"image": "y", "annotated_classes": [2, 3, 4]})
    full = t({"image": "z"})  # no list: fully labeled (fused / pseudo labels)
    assert a["annotated"].tolist() == [True, True, False, True, False]
    assert "annotated_classes" not in a  # lists of different lengths would break collation
    assert full["annotated"].all()
    batch = list_data_collate([a, b, full])
    assert batch["annotated"].shape == (3, C) and batch["annotated"].dtype == torch.bool
    assert batch["annotated"][1].tolist() == [True, False, True, True, True]
    with pytest.raises(KeyError):
        AnnotatedClassesd(num_classes=C, missing="error")({"image": "z"})
    with pytest.raises(ValueError, match="outside"):
        annotated_mask([7], C)


def test_exclusion_terms_match_float64_brute_force():
    logits, label = _data(6)
    logits[0, 1, 0, 0, 0] = 40.0  # a saturated voxel: p_1 rounds to 1 in float32
    ann = _ann([[1, 1, 0, 1, 1], [1, 1, 0, 1, 0]])
    label[1][label[1] == 4] = 0
    t = MarginalExclusionLoss(num_classes=C).components(logits, label, ann)
    p = torch.softmax(logits.double(), 1).flatten(2)
    e = (label.flatten(2) > 0).double()
    unann = [[2], [2, 4]]
    ce = [sum((-(torch.log1p(-p[b, k])) * e[b, 0]).mean() for k in unann[b]) for b in range(2)]
    dice = [2 * (p[b, k] * e[b, 0]).sum() / (e[b, 0].sum() + p[b, k].sum() + 1e-5) for b in range(2) for k in unann[b]]
    assert float(t["exclusion_ce"]) == pytest.approx(float(sum(ce) / 2), rel=1e-4)
    assert float(t["exclusion_dice"]) == pytest.approx(float(sum(dice) / 3), rel=1e-4)


def test_marginal_loss_learns_the_union_of_complementary_partial_labels():
    """Two partial labels of the same image, one annotating class 1 and the other class 2:
    fitting shared logits with the marginal loss recovers both organs, while plain DiceCE on
    the partial labels (unannotated = background) sees conflicting targets and loses them."""
    full = torch.zeros(1, 1, 6, 6, 2, dtype=torch.long)
    full[..., :3, :3, :] = 1
    full[..., 3:, 3:, :] = 2
    partial = torch.cat([torch.where(full == 1, 1, 0), torch.where(full == 2, 2, 0)])
    # classes 3 and 4 are annotated (absent) in both; were they never annotated anywhere, true
    # background and class 3/4 would be indistinguishable under the marginal loss.
    ann = _ann([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]])

    def fit(loss_fn):
        torch.manual_seed(0)
        z = torch.zeros(1, C, 6, 6, 2, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.3)
        for _ in range(25):
            opt.zero_grad()
            loss_fn(z.expand(2, -1, -1, -1, -1)).backward()
            opt.step()
        return torch.softmax(z.detach(), 1)

    organs = full[:, 0] > 0
    marginal = MarginalExclusionLoss(num_classes=C)
    prob = fit(lambda z: marginal(z, partial, ann))
    assert torch.equal(prob.argmax(1, keepdim=True), full)
    assert float(torch.gather(prob, 1, full)[:, 0][organs].min()) > 0.9
    naive = DiceCELoss(to_onehot_y=True, softmax=True)
    prob_naive = fit(lambda z: naive(z, partial))
    # conflicting targets (organ in one case, background in the other): no confident organ
    assert float(torch.gather(prob_naive, 1, full)[:, 0][organs].max()) < 0.7


def test_supervised_trainer_with_packed_targets_and_pocket_unet_deep_supervision():
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.transforms import Compose, EnsureTyped

    from abdoseg.training.losses import PackedTargetPrepareBatch
    from abdoseg.networks import PocketUNet

    g = torch.Generator().manual_seed(0)
    items = []
    for i, classes in enumerate(([1, 3], [2, 3, 4])):
        lab = torch.zeros(1, 8, 8, 8, dtype=torch.long)
        for c in classes:
            lab[0, 2 * c - 2: 2 * c, 2:6, 2:6] = c
        items.append({"image": torch.randn(1, 8, 8, 8, generator=g), "label": lab, "annotated_classes": classes})
    ds = Dataset(items, transform=Compose([AnnotatedClassesd(num_classes=C), EnsureTyped(keys=["image", "label"])]))
    torch.manual_seed(0)
    net = PocketUNet(spatial_dims=3, in_channels=1, out_channels=C, channels=4,
                     kernel_size=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                     deep_supervision=True, deep_supr_num=1)
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=DataLoader(ds, batch_size=2),
        network=net, optimizer=torch.optim.Adam(net.parameters(), 1e-2),
        loss_function=MarginalExclusionLoss(num_classes=C), prepare_batch=PackedTargetPrepareBatch(num_classes=C),
        decollate=False,
    )
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ seed 000: sigmoid BCE + Dice


def test_labels_to_multichannel_drops_background():
    label = torch.tensor([0, 1, 3, 2]).reshape(1, 1, 4, 1, 1)
    y = labels_to_multichannel(label, num_classes=4)
    assert y.shape == (1, 3, 4, 1, 1) and y.dtype == torch.float32
    assert y[0, :, :, 0, 0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert labels_to_multichannel(label, 4, include_background=True)[0, 0, :, 0, 0].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="0..3"):
        labels_to_multichannel(label + 1, num_classes=4)


def test_sigmoid_loss_exact_numbers_on_zero_logits():
    """Zero logits: p = 0.5 everywhere, BCE = ln 2; voxels (1, 0): class 1 Dice loss =
    1 - (2*0.5 + s)/(1 + 1 + s), class 2 (absent) = 1 - s/(1 + s)."""
    s = 1e-5
    logits = torch.zeros(1, 3, 2, 1, 1)
    label = torch.tensor([1, 0]).reshape(1, 1, 2, 1, 1)
    want_dice = ((1 - (1 + s) / (2 + s)) + (1 - s / (1 + s))) / 2
    loss = SigmoidDiceBCELoss(num_classes=3)
    assert float(loss(logits, label)) == pytest.approx(math.log(2) + want_dice, abs=1e-6)
    assert float(SigmoidDiceBCELoss(num_classes=3, lambda_dice=0)(logits, label)) == pytest.approx(math.log(2), abs=1e-7)
    assert float(SigmoidDiceBCELoss(num_classes=3, lambda_bce=0)(logits, label)) == pytest.approx(want_dice, abs=1e-6)
    # the same with foreground-only logits (C - 1 channels): the background channel is ignored
    assert float(loss(logits[:, 1:], label)) == pytest.approx(float(loss(logits, label)), abs=0)


def test_sigmoid_loss_matches_hand_computation_and_ignores_background_channel():
    logits, label = _data(3)
    p = torch.sigmoid(logits[:, 1:])
    y = torch.stack([(label[:, 0] == c).float() for c in range(1, C)], dim=1)
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    inter = (p * y).flatten(2).sum(-1)
    dice = (1 - (2 * inter + 1e-5) / (p.flatten(2).sum(-1) + y.flatten(2).sum(-1) + 1e-5)).mean()
    loss = SigmoidDiceBCELoss(num_classes=C)
    assert torch.allclose(loss(logits, label), bce + dice, atol=1e-5)
    changed = logits.clone()
    changed[:, 0] += 7.0  # background channel unused without include_background
    assert torch.allclose(loss(changed, label), loss(logits, label))
    with_bg = SigmoidDiceBCELoss(num_classes=C, include_background=True)
    assert not torch.allclose(with_bg(changed, label), with_bg(logits, label))
    # a multi-channel binary target gives the same number as the ids
    assert torch.allclose(loss(logits, y), loss(logits, label))
    with pytest.raises(ValueError, match="channels"):
        loss(logits[:, :3], label)


def test_sigmoid_loss_equals_monai_dicece_for_one_channel_but_not_for_several():
    logits, label = _data(4)
    binary = (label == 1).long()
    z = logits[:, 1:2]
    ref = DiceCELoss(sigmoid=True)(z, binary.float())  # MONAI: one channel -> BCE + sigmoid Dice
    assert torch.allclose(SigmoidDiceBCELoss(num_classes=2)(z, binary), ref, atol=1e-6)
    # several channels: MONAI's DiceCELoss(sigmoid=True) uses softmax CE, not per-class BCE
    y = labels_to_multichannel(label, C)
    monai_multi = DiceCELoss(sigmoid=True)(logits[:, 1:], y)
    assert not torch.allclose(SigmoidDiceBCELoss(num_classes=C)(logits, label), monai_multi, atol=1e-3)


def test_sigmoid_loss_deep_supervision_levels():
    logits, label = _data(5, shape=(4, 4, 2))
    low = torch.randn(2, C, 2, 2, 1)
    loss = SigmoidDiceBCELoss(num_classes=C)  # MONAI "exp" weights: 1, 0.5
    small = torch.nn.functional.interpolate(label.float(), size=(2, 2, 1), mode="nearest-exact")
    want = loss(logits, label) + 0.5 * loss(low, small)
    assert torch.allclose(loss([logits, low], label), want, atol=1e-6)
    stack = torch.stack([logits, logits * 0.5], dim=1)  # DynUNet (B, L, C, *S)
    assert torch.allclose(loss(stack, label), loss(logits, label) + 0.5 * loss(logits * 0.5, label), atol=1e-6)


def test_sigmoid_logits_to_labels_threshold_and_argmax():
    # voxels: class 2 strongest and > 0.5; nothing above 0.5; class 1 only
    z = torch.tensor([[9.0, 9.0, 9.0], [0.5, -1.0, 2.0], [1.5, -0.1, -3.0]]).reshape(1, 3, 3, 1, 1)
    out = sigmoid_logits_to_labels(z)
    assert out.shape == (1, 1, 3, 1, 1) and out.flatten().tolist() == [2, 0, 1]
    assert sigmoid_logits_to_labels(z, threshold=0.2).flatten().tolist() == [2, 2, 1]  # logit(0.2) = -1.386
    assert sigmoid_logits_to_labels(z[0, 1:], has_background_channel=False, dim=0).flatten().tolist() == [2, 0, 1]


def test_sigmoid_loss_trains_tiny_msff_unet():
    from abdoseg.networks import MSFFUNet

    torch.manual_seed(0)
    net = MSFFUNet(out_channels=3, channels=(4, 8))
    x = torch.randn(1, 1, 8, 8, 8)
    label = (x > 0.5).long() + (x > 1.2).long()
    loss_fn = SigmoidDiceBCELoss(num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-5)  # seed 000's Adam
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(net(x), label)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
