"""Checks the Triton in use for the chained-product miscompile the grid kernel works around.

``python -m benchmarks.triton_chained_dot`` (CUDA): one layer pair, relu(h @ W1 + b1) @ W2 with
fp16 weights, written three ways: v0 and v1 as activations @ weights (activations as the
matrix units' A operand, from registers; v1 with the accumulator form), v2 transposed as
weights @ activations (the form kernels/_triton/grid_mlp.py uses). Each against torch, at
several tile sizes. On an H100 with Triton 3.6 (2026-11-23), v0 and v1 were wrong at
H=64, NEXT=16, BN=64 and at H=256, NEXT=16 with one stage; v2 was right everywhere.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def pair_kernel(
    h_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    out_ptr,
    H: tl.constexpr,
    NEXT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    VARIANT: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, H)
    chunk = tl.arange(0, BN)
    nc = tl.arange(0, NEXT)
    h = tl.load(h_ptr + rows[:, None] * H + cols[None, :])  # fp32, like the kernel's first layer
    h = tl.maximum(h * 1.0, 0.0)
    if VARIANT == 2:
        hT = tl.trans(h).to(tl.float16)
        accT = tl.zeros((NEXT, BM), tl.float32)
        for n0 in range(0, H, BN):
            wT = tl.load(w1_ptr + cols[None, :] * H + (n0 + chunk)[:, None])
            zT = tl.maximum(tl.dot(wT, hT) + tl.load(b1_ptr + n0 + chunk)[:, None], 0.0)
            w2T = tl.load(w2_ptr + (n0 + chunk)[None, :] * NEXT + nc[:, None])
            accT += tl.dot(w2T, zT.to(tl.float16))
        acc = tl.trans(accT)
    else:
        h16 = h.to(tl.float16)
        acc = tl.zeros((BM, NEXT), tl.float32)
        for n0 in range(0, H, BN):
            w = tl.load(w1_ptr + cols[:, None] * H + (n0 + chunk)[None, :])
            if VARIANT == 0:
                z = tl.maximum(
                    tl.dot(h.to(tl.float16), w, out_dtype=tl.float32) + tl.load(b1_ptr + n0 + chunk)[None, :],
                    0.0,
                )
            else:
                z = tl.maximum(tl.dot(h16, w) + tl.load(b1_ptr + n0 + chunk)[None, :], 0.0)
            w2 = tl.load(w2_ptr + (n0 + chunk)[:, None] * NEXT + nc[None, :])
            if VARIANT == 0:
                acc += tl.dot(z.to(tl.float16), w2, out_dtype=tl.float32)
            else:
                acc = tl.dot(z.to(tl.float16), w2, acc)
    tl.store(out_ptr + rows[:, None] * NEXT + nc[None, :], acc)


def check(H, NEXT, BM, BN, variant, stages=None, warps=4, M=256):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(M, H, device="cuda", generator=g)
    w1 = (torch.randn(H, H, device="cuda", generator=g) / H**0.5).half()
    b1 = torch.randn(H, device="cuda", generator=g)
    w2 = (torch.randn(H, NEXT, device="cuda", generator=g) / H**0.5).half()
    out = torch.full((M, NEXT), float("nan"), device="cuda")
    kw = {"num_stages": stages} if stages else {}
    try:
        pair_kernel[(M // BM,)](h, w1, b1, w2, out, H, NEXT, BM, BN, variant, num_warps=warps, **kw)
        torch.cuda.synchronize()
        z = torch.relu(h.relu().half().float() @ w1.float() + b1)
        ref = z.half().float() @ w2.float()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        msg = f"rel err {err:.1e} {'OK' if err < 1e-2 else 'WRONG'}"
    except Exception as e:
        msg = f"{type(e).__name__} {str(e)[:80]}"
    print(f"H{H} NEXT{NEXT} BM{BM} BN{BN} v{variant} stages{stages} warps{warps}: {msg}", flush=True)


if __name__ == "__main__":
    for variant in (0, 1, 2):
        for H, NEXT, BM, BN in [
            (64, 16, 64, 64),
            (64, 16, 64, 32),
            (64, 64, 64, 64),
            (256, 256, 32, 64),
            (256, 16, 64, 64),
            (64, 16, 16, 64),
        ]:
            for stages in (None, 1):
                check(H, NEXT, BM, BN, variant, stages)
