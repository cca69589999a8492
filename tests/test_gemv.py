"""kvshare.gemv's Triton kernel computes what kvshare.decode.linear_reference does: x @ W.T + b, alone or with the
residual after it (run by Triton's CPU interpreter, which tests/conftest.py turns on; float32: its bf16 agreement
with cuBLAS on a GPU is recorded by benchmarks/decode_kernels_bench.py)."""

import pytest
import torch


def _kernel_linear(x, w, b=None, residual=None):
    """kvshare.gemv.linear's call of the kernel, on the CPU with one block configuration (no autotuning)."""
    import kvshare.gemv as gemv

    rows, n = x.numel() // x.shape[-1], w.shape[0]
    flat = x.reshape(rows, -1)
    res = None if residual is None else residual.reshape(rows, -1)
    y = gemv._launch(gemv._kernel.fn, flat, w, b, res, BLOCK_N=16, BLOCK_K=128)
    return y.view(*x.shape[:-1], n)


@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "residual"),
    [(1, 40, 300, False, False), (3, 64, 512, True, False), (16, 100, 256, True, False), (5, 33, 128, False, True),
     (1, 64, 256, True, True)],
)  # fmt: skip
def test_kernel_equals_reference(rows, n, k, bias, residual):
    from kvshare.decode import linear_reference

    torch.manual_seed(0)
    x, w = torch.randn(rows, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    res = torch.randn(rows, n) if residual else None
    want = linear_reference(x, w, b, residual=res)
    got = _kernel_linear(x, w, b, res)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("around", ["", "norm", "norm act", "residual", "act residual"])
def test_product_form_equals_reference(around, monkeypatch):
    """linear_product (GraphDecoder's gemv="triton"): the kernel's product, the residual added inside it where no
    activation follows, the norm and activation around it, as linear_reference computes them; linear_product_pdl
    the same, its kernel launched by programmatic dependent launch."""
    import kvshare.gemv as gemv
    from kvshare.decode import linear_reference

    calls = []

    def kernel(*args, pdl, **kwargs):
        calls.append(dict(kwargs, pdl=pdl))
        return _kernel_linear(*args, **kwargs)

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
