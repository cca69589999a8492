"""kvshare.gemv's Triton kernel computes what kvshare.decode.linear_reference does: x @ W.T + b, alone or with the
norm before it, the gated activation after it or the residual added (run by Triton's CPU interpreter, which tests/conftest.py turns on; float32: its bf16 agreement
with cuBLAS on a GPU is recorded by benchmarks/decode_kernels_bench.py)."""

import pytest
import torch


def _kernel_linear(x, w, b=None, residual=None, pdl=False, norm=None, eps=0.0, act=None):
    """kvshare.gemv.linear's call of the kernel, on the CPU with one block configuration (no autotuning)."""
    import kvshare.gemv as gemv

    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, -1)
    res = None if residual is None else residual.reshape(rows, -1)
    y = gemv._launch(gemv._kernel.fn, flat, w, b, res, norm=norm, eps=eps, glu=act is not None, BLOCK_N=16,
                     BLOCK_K=128)  # fmt: skip
    return y.view(*x.shape[:-1], y.shape[-1])


@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "residual", "norm", "act"),
    [(1, 40, 300, False, False, False, False), (3, 64, 512, True, False, False, False),
     (16, 100, 256, True, False, False, False), (5, 33, 128, False, True, False, False),
     (1, 64, 256, True, True, False, False), (3, 40, 300, True, False, True, False),
     (2, 33, 256, True, False, True, True), (16, 24, 128, False, True, True, True), (1, 17, 200, False, False, False, True)],
)  # fmt: skip
def test_kernel_equals_reference(rows, n, k, bias, residual, norm, act):
    from kvshare.decode import linear_reference

    torch.manual_seed(0)
    width = 2 * n if act else n  # with the activation the weight's rows are [gate; up]
    x, w = torch.randn(rows, k), torch.randn(width, k)
    b = torch.randn(width) if bias else None
    res = torch.randn(rows, n) if residual else None
    scale = torch.randn(k) if norm else None
    act = "silu" if act else None
    want = linear_reference(x, w, b, scale, 1e-5, act, res)
    got = _kernel_linear(x, w, b, res, norm=scale, eps=1e-5, act=act)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("around", ["", "norm", "norm act", "residual", "act residual"])
def test_product_form_equals_reference(around, monkeypatch):
    """linear_product (GraphDecoder's gemv="triton"): the kernel's product, the residual added inside it where no
    activation follows, the norm and activation around it, as linear_reference computes them; linear_fused
    (gemv="triton-fused"): all of it by the kernel; the _pdl forms the same, launched by programmatic dependent
    launch."""
    import kvshare.gemv as gemv
    from kvshare.decode import linear_reference

    calls = []

    def kernel(x, w, b=None, residual=None, pdl=False, norm=None, eps=0.0, act=None):
        calls.append(dict(residual=residual, pdl=pdl, norm=norm, act=act))
        return _kernel_linear(x, w, b, residual, norm=norm, eps=eps, act=act)

    monkeypatch.setattr(gemv, "linear", kernel)
    torch.manual_seed(0)
    around = around.split()
    x, w = torch.randn(1, 2, 64), torch.randn(2 * 24 if "act" in around else 24, 64)
    b = torch.randn(w.shape[0])
    norm = torch.randn(64) if "norm" in around else None
    act = "silu" if "act" in around else None
    res = torch.randn(1, 2, 24) if "residual" in around else None
    want = linear_reference(x, w, b, norm, 1e-5, act, res)
    got = gemv.linear_product(x, w, b, norm, 1e-5, act, res)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert len(calls) == 1 and (calls[0].get("residual") is not None) == (res is not None and act is None)
    assert not calls[0]["pdl"]
    assert (gemv.linear_product_pdl(x, w, b, norm, 1e-5, act, res) - got).abs().max() == 0 and calls[1]["pdl"]
    fused = gemv.linear_fused(x, w, b, norm, 1e-5, act, res)  # GraphDecoder's gemv="triton-fused": all in one call
    assert fused.shape == want.shape and (fused - want).abs().max() <= 1e-4 * want.abs().max()
    assert len(calls) == 3 and calls[2]["norm"] is norm and calls[2]["act"] == act and not calls[2]["pdl"]
    assert (calls[2]["residual"] is None) == (res is None)
    assert (gemv.linear_fused_pdl(x, w, b, norm, 1e-5, act, res) - fused).abs().max() == 0 and calls[3]["pdl"]
