import pytest
import torch

from sfm_hf.ridge import RidgeMoments, choose_lambda, fit_ridge, lambda_grid, prior_map, squared_error


def moments_of(x, y, groups=None, count=1):
    groups = torch.zeros(len(x), dtype=torch.long) if groups is None else groups
    moments = RidgeMoments.zeros(count, x.shape[1], y.shape[1])
    moments.add(x, y, groups)
    return moments


def test_recovers_a_known_linear_map_from_noisy_data():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=generator)
    bias = torch.randn(5, generator=generator)
    x = torch.randn(4000, 8, generator=generator) * 2 + 1
    y = x @ weight.T + bias + 0.05 * torch.randn(4000, 5, generator=generator)
    fitted_weight, fitted_bias = fit_ridge(moments_of(x, y), 1e-6, prior_map(8, 5))
    assert torch.allclose(fitted_weight.float(), weight, atol=0.01)
    assert torch.allclose(fitted_bias.float(), bias, atol=0.02)


def test_matches_the_normal_equations_of_the_penalised_problem():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    lam, prior = 0.3, prior_map(6, 6)
    weight, bias = fit_ridge(moments_of(x, y), lam, prior)
    # Direct: centre, then (Xc^T Xc / n + lam I) W^T = Xc^T Yc / n + lam W0^T.
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = len(x)
    expected = torch.linalg.solve(xc.T @ xc / n + lam * torch.eye(6, dtype=torch.float64), xc.T @ yc / n + lam * prior.T).T
    assert torch.allclose(weight, expected, atol=1e-10)
    assert torch.allclose(bias, y.mean(0) - expected @ x.mean(0), atol=1e-10)


@pytest.mark.parametrize("y_dim", [6, 4])
def test_infinite_lambda_gives_the_prior_identity_or_zero(y_dim):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=generator)
    y = torch.randn(200, y_dim, generator=generator) * 3 + 2
    prior = prior_map(6, y_dim)
    assert torch.equal(prior, torch.eye(6, dtype=torch.float64) if y_dim == 6 else torch.zeros(y_dim, 6, dtype=torch.float64))
    weight, bias = fit_ridge(moments_of(x, y), 1e12, prior)
    assert torch.allclose(weight, prior, atol=1e-8)
    assert torch.allclose(bias, y.double().mean(0) - prior @ x.double().mean(0), atol=1e-6)


def test_identity_prior_keeps_the_identity_for_same_features():
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(3))
    for lam in (0.0, 1e-3, 10.0):
        weight, bias = fit_ridge(moments_of(x, x), lam, prior_map(10, 10))
        assert torch.allclose(weight, torch.eye(10, dtype=torch.float64), atol=1e-8)
        assert torch.allclose(bias, torch.zeros(10, dtype=torch.float64), atol=1e-8)


def test_streamed_moments_and_error_equal_the_direct_computation():
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(90, 5, generator=generator), torch.randn(90, 3, generator=generator)
    groups = torch.arange(90) % 3
    streamed = RidgeMoments.zeros(3, 5, 3)
    for part in range(0, 90, 20):
        streamed.add(x[part:part + 20], y[part:part + 20], groups[part:part + 20])
    whole = moments_of(x, y)
    assert torch.allclose(streamed.select(torch.ones(3, dtype=torch.bool)).xx, whole.xx)
    weight, bias = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direct = ((x.double() @ weight.T + bias - y.double()) ** 2).sum(1).mean()
    assert squared_error(streamed, weight, bias) == pytest.approx(float(direct), rel=1e-9)


def test_held_out_groups_choose_small_lambda_for_signal_and_large_for_noise():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(600, 20, generator=generator)
    groups = torch.arange(600) % 5
    ratios = [1e-6, 1e-3, 1e-1, 1e1, 1e3]
    signal = x @ torch.randn(20, 7, generator=generator)
    chosen, _ = choose_lambda(moments_of(x, signal, groups, 5), lambda_grid(moments_of(x, signal), ratios), prior_map(20, 7))
    assert chosen == pytest.approx(lambda_grid(moments_of(x, signal), ratios)[0])
    # Few rows and targets unrelated to x: any fitted slope is noise, the zero prior wins.
    few, few_groups = x[:30], groups[:30]
    noise = torch.randn(30, 7, generator=generator)
    grid = lambda_grid(moments_of(few, noise), ratios)
    chosen, errors = choose_lambda(moments_of(few, noise, few_groups, 5), grid, prior_map(20, 7))
    assert chosen == grid[-1]
    assert errors[-1] < errors[0]
