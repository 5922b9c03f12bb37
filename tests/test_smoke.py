import torch

from passes import capture, estimate


def test_linear_estimate_counts_matmul_flops():
    model = torch.nn.Linear(64, 32)
    est = estimate(model, (torch.randn(8, 64),))
    assert est.flops == 2 * 8 * 64 * 32
    gm = capture(model, (torch.randn(8, 64),))
    torch.testing.assert_close(gm(torch.ones(8, 64)), model(torch.ones(8, 64)))
