import torch

from busi.confidence import ece, fit_temperature, nll, reliability_bins


def test_ece_of_a_perfectly_calibrated_set_is_about_zero():
    # within each confidence level, exactly that share of predictions is right
    g = torch.Generator().manual_seed(0)
    probs, labels = [], []
    for conf in (0.4, 0.6, 0.8, 1.0):
        n = 1000
        p = torch.tensor([conf, (1 - conf) / 2, (1 - conf) / 2])
        right = torch.rand(n, generator=g).argsort() < int(conf * n)
        probs.append(p.repeat(n, 1))
        labels.append(torch.where(right, 0, 1))
    probs, labels = torch.cat(probs), torch.cat(labels)
    assert ece(probs, labels) < 0.01
    overconfident = torch.tensor([[0.99, 0.005, 0.005]]).repeat(len(labels), 1)
    assert ece(overconfident, labels) > 0.2
    bins = reliability_bins(probs, labels)
    assert len(bins) == 15 and sum(b["n"] for b in bins) == len(labels)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (600,), generator=g)
    clean = torch.nn.functional.one_hot(labels, 3).float() * 2 + torch.randn(600, 3, generator=g) * 1.5
    logits = clean * 6  # same ranking, far too sure of itself
    t = fit_temperature(logits, labels)
    assert t > 2
    assert nll(logits, labels, t) < nll(logits, labels) - 0.3
    assert ece(torch.softmax(logits / t, 1), labels) < ece(torch.softmax(logits, 1), labels)
