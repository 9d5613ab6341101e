"""Objectives (Eq. 1-9 of the SFM paper) against closed-form identities and autograd."""

import pytest
import torch
import torch.nn.functional as F

from sfm_hf.objectives import (
    centre_flow_loss,
    class_centres,
    decoupled_centre_loss,
    flow_cosine,
    lgm_loss,
    linear_head_gradient,
    mean_spread_loss,
    non_target_centres,
    random_linear_head,
    sfm_loss,
    statistical_flow,
)

C, D = 5, 7


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _real_statistics(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(C, D, generator=_generator(seed))
    return means, statistical_flow(means, torch.full((C,), 10))


def _images_around(means: torch.Tensor, ipc: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc features per class, spread around the class mean with zero per-class offset."""
    offsets = torch.randn(len(means), ipc, means.shape[1], generator=_generator(seed))
    offsets = offsets - offsets.mean(1, keepdim=True)
    features = (means.unsqueeze(1) + offsets).reshape(-1, means.shape[1])
    return features, torch.arange(len(means)).repeat_interleave(ipc)


def test_analytic_gradient_is_the_flow_eq7():
    a = 4
    features = torch.randn(a * C, D, generator=_generator(), dtype=torch.float64)
    labels = torch.arange(C).repeat(a)
    weight, bias = random_linear_head(C, D, generator=_generator(1), dtype=torch.float64)
    grad_weight, grad_bias = linear_head_gradient(features, labels, weight, bias, analytic=True)
    assert grad_weight.dtype == torch.float64
    for c in range(C):
        expected = (C - 1) / C**2 * (features[labels != c].mean(0) - features[labels == c].mean(0))
        torch.testing.assert_close(grad_weight[c], expected, rtol=1e-6, atol=1e-12)
    # Balanced: every class gets (1/C - 1/C) in the bias gradient.
    torch.testing.assert_close(grad_bias, torch.zeros(C, dtype=torch.float64))


def test_linear_head_gradient_matches_cross_entropy_autograd():
    features = torch.randn(12, D, generator=_generator(), dtype=torch.float64)
    labels = torch.randint(0, C, (12,), generator=_generator(1))
    weight = torch.randn(C, D, generator=_generator(2), dtype=torch.float64).requires_grad_()
    bias = torch.randn(C, generator=_generator(3), dtype=torch.float64).requires_grad_()
    F.cross_entropy(features @ weight.T + bias, labels).backward()
    grad_weight, grad_bias = linear_head_gradient(features, labels, weight.detach(), bias.detach())
    torch.testing.assert_close(grad_weight, weight.grad)
    torch.testing.assert_close(grad_bias, bias.grad)


def test_lgm_feature_gradient_matches_double_backward():
    real = torch.randn(20, D, generator=_generator(), dtype=torch.float64)
    real_labels = torch.arange(C).repeat(4)
    syn_labels = torch.arange(C).repeat(2)
    weight = torch.randn(C, D, generator=_generator(2), dtype=torch.float64) * 0.5
    bias = torch.randn(C, generator=_generator(3), dtype=torch.float64) * 0.5
    syn = torch.randn(10, D, generator=_generator(4), dtype=torch.float64).requires_grad_()

    lgm_loss(syn, syn_labels, real, real_labels, weight, bias).backward()

    head = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    real_grads = torch.autograd.grad(F.cross_entropy(real @ head[0].T + head[1], real_labels), head)
    syn_ref = syn.detach().clone().requires_grad_()
    syn_grads = torch.autograd.grad(F.cross_entropy(syn_ref @ head[0].T + head[1], syn_labels), head,
                                    create_graph=True)
    reference = 1 - F.cosine_similarity(torch.cat([g.flatten() for g in real_grads]),
                                        torch.cat([g.flatten() for g in syn_grads]), dim=0)
    reference.backward()
    torch.testing.assert_close(syn.grad, syn_ref.grad)


@pytest.mark.parametrize("ipc", [1, 3])
def test_sfm_loss_zero_at_match(ipc):
    means, flow = _real_statistics()
    features, labels = _images_around(means, ipc)
    assert float(sfm_loss(features, labels, means, flow)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_decoupled_loss_zero_at_match(alpha):
    means, flow = _real_statistics()
    assert float(decoupled_centre_loss(means.clone(), means, flow, alpha)) == pytest.approx(0.0, abs=1e-10)


def test_decoupled_loss_is_the_authors_mse_mix():
    """alpha MSE(mu*, m) + (1 - alpha) MSE(nu*, nu^s), written out by hand; unlike the cosine it sees scale."""
    means, flow = _real_statistics()
    centres = torch.randn(C, D, generator=_generator(7), dtype=torch.float64)
    real_non_target = (means.sum(0) - means) / (C - 1)
    synthetic_non_target = (centres.sum(0) - centres) / (C - 1)
    target = ((centres - means) ** 2).mean()
    non_target = ((synthetic_non_target - real_non_target) ** 2).mean()
    torch.testing.assert_close(decoupled_centre_loss(centres, means, flow, 1.0), target)
    torch.testing.assert_close(decoupled_centre_loss(centres, means, flow, 0.0), non_target)
    torch.testing.assert_close(decoupled_centre_loss(centres, means, flow, 0.25), 0.25 * target + 0.75 * non_target)
    scaled = decoupled_centre_loss(2 * means, means, flow, 1.0)
    assert float(scaled) == pytest.approx(float((means**2).mean()))


def test_sfm_loss_scale_invariance_and_sign():
    means, flow = _real_statistics()
    features = torch.randn(3 * C, D, generator=_generator(5))
    labels = torch.arange(C).repeat(3)
    loss = sfm_loss(features, labels, means, flow)
    assert float(sfm_loss(features * 7.3, labels, means, flow)) == pytest.approx(float(loss), abs=1e-6)
    matched, matched_labels = _images_around(means, 3)
    assert float(sfm_loss(-matched, matched_labels, means, flow)) == pytest.approx(2.0, abs=1e-6)


def test_sfm_loss_bf16_features_and_gradient():
    means, flow = _real_statistics()
    features = torch.randn(2 * C, D, generator=_generator(6)).bfloat16().requires_grad_()
    loss = sfm_loss(features, torch.arange(C).repeat(2), means, flow)
    assert loss.dtype == torch.float32
    loss.backward()
    assert features.grad is not None and bool(features.grad.abs().sum() > 0)


def test_flow_cosine_is_one_flattened_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, -10.0]])
    # Per-row cosines would average to 0; the flattened cosine is dominated by the long row.
    assert float(flow_cosine(a, b)) == pytest.approx(-99 / 101, abs=1e-6)


def test_non_target_centres_modes():
    means = torch.randn(C, D, generator=_generator(), dtype=torch.float64)
    balanced = torch.full((C,), 8)
    torch.testing.assert_close(non_target_centres(means, balanced, "class_mean"),
                               non_target_centres(means, balanced, "sample"))
    unbalanced = torch.tensor([1, 2, 30, 4, 50])
    assert not torch.allclose(non_target_centres(means, unbalanced, "class_mean"),
                              non_target_centres(means, unbalanced, "sample"))


def test_non_target_centres_sample_mode_matches_raw_samples():
    labels = torch.arange(C).repeat_interleave(torch.tensor([1, 2, 30, 4, 50]))
    samples = torch.randn(len(labels), D, generator=_generator(), dtype=torch.float64)
    means = class_centres(samples, labels, C)
    counts = torch.bincount(labels, minlength=C)
    brute = torch.stack([samples[labels != c].mean(0) for c in range(C)])
    torch.testing.assert_close(non_target_centres(means, counts, "sample"), brute)
    torch.testing.assert_close(statistical_flow(means, counts, "sample"), (brute - means).float())


def test_class_centres_names_missing_class():
    features = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"\b2\b"):
        class_centres(features, torch.tensor([0, 1, 3, 3]), 4)


def test_lgm_loss_gradient_reaches_synthetic_only():
    weight, bias = random_linear_head(C, D, generator=_generator())
    syn = torch.randn(C, D, generator=_generator(1)).requires_grad_()
    real = torch.randn(4 * C, D, generator=_generator(2)).requires_grad_()
    loss = lgm_loss(syn, torch.arange(C), real, torch.arange(C).repeat(4), weight, bias)
    loss.backward()
    assert syn.grad is not None and bool(syn.grad.abs().sum() > 0)
    assert real.grad is None


@pytest.mark.parametrize("analytic", [False, True])
def test_lgm_loss_zero_for_identical_batches(analytic):
    weight, bias = random_linear_head(C, D, generator=_generator())
    features = torch.randn(3 * C, D, generator=_generator(1))
    labels = torch.arange(C).repeat(3)
    loss = lgm_loss(features.clone(), labels, features, labels, weight, bias, analytic=analytic)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_random_linear_head_is_seeded_gaussian():
    weight, bias = random_linear_head(100, 200, generator=_generator(7))
    again, _ = random_linear_head(100, 200, generator=_generator(7))
    torch.testing.assert_close(weight, again)
    assert weight.shape == (100, 200) and bool((bias == 0).all())
    assert float(weight.std()) == pytest.approx(0.01, rel=0.05)


def test_sfm_loss_is_the_cosine_of_the_centred_class_means():
    """With the class-mean non-target flow, F^s_c = -C/(C-1) (m_c - mean(m)) and F*_c likewise: Eq. 9 is
    1 - cos(centred synthetic centres, centred real means), blind to where the centres sit and to their scale."""
    means, flow = _real_statistics()
    centres = torch.randn(C, D, generator=_generator(8), dtype=torch.float64)
    loss = centre_flow_loss(centres, means, flow)
    centred = F.cosine_similarity((centres - centres.mean(0)).flatten(), (means - means.mean(0)).double().flatten(),
                                  dim=0)
    torch.testing.assert_close(loss, 1 - centred)
    offset = torch.randn(D, generator=_generator(9), dtype=torch.float64) * 100
    torch.testing.assert_close(centre_flow_loss(3.7 * centres + offset, means, flow), loss)


def test_the_mean_spread_term_sees_what_the_cosine_cannot():
    """Zero at the real means; an offset or a scale of every centre (invisible to Eq. 9) raises it by exactly
    C ||b||^2 / S and (s - 1)^2, S the real class spread."""
    means, _ = _real_statistics()
    means = means.double()
    spread = (means - means.mean(0)).square().sum()
    assert float(mean_spread_loss(means, means)) == pytest.approx(0.0, abs=1e-12)
    offset = torch.randn(D, generator=_generator(9), dtype=torch.float64)
    torch.testing.assert_close(mean_spread_loss(means + offset, means), C * offset.square().sum() / spread)
    torch.testing.assert_close(mean_spread_loss(means.mean(0) + 2.5 * (means - means.mean(0)), means),
                               torch.tensor(1.5**2, dtype=torch.float64))
    # The direction of the centred centres is left to the cosine: a rotation within the class plane costs nothing.
    swapped = means.mean(0) + (means - means.mean(0))[torch.roll(torch.arange(C), 1)]
    assert float(mean_spread_loss(swapped, means)) == pytest.approx(0.0, abs=1e-12)


def test_sfm_step_loss_adds_the_weighted_mean_spread_term(monkeypatch):
    """distill.mean_spread_weight 0 is Eq. 9 alone; lambda adds lambda x mean_spread_loss of the same centres."""
    from types import SimpleNamespace

    from sfm_hf.distill import losses

    means, flow = _real_statistics()
    centres = torch.randn(C, D, generator=_generator(10)) + 3.0
    monkeypatch.setattr(losses, "synthetic_centres", lambda context, images, step: centres)
    for weight in (0.0, 0.7):
        context = SimpleNamespace(target_means=means, target_flow=flow,
                                  config=SimpleNamespace(distill=SimpleNamespace(mean_spread_weight=weight)))
        expected = centre_flow_loss(centres, means, flow) + weight * mean_spread_loss(centres, means)
        torch.testing.assert_close(losses.sfm_step_loss(context, None, 0), expected)
