"""A grouped 2-d convolution written in Triton, for stacked clients (``fl_core.fl.stacked``).

cuDNN runs the stacked model's grouped convolutions in channels-last by first copying each group's
channel block out of every activation (``nhwcSliceCKernel``: a fifth of a graphed round's GPU time at
the peers' protocol on an H100). These kernels read each group's block in place: one implicit-GEMM
kernel for the forward pass and the input gradient (a transposed convolution), one for the weight
gradient, with the group as a grid dimension. Inputs float32 (TF32 where
``torch.backends.cudnn.allow_tf32`` lets cuDNN use it too), bfloat16 or float16 accumulate in
float32, float64 in float64. The weight gradient splits its long reduction over output pixels into
fixed chunks summed afterwards, never with atomics, so results do not vary between runs. Block
sizes follow fixed rules of the shapes (no autotuning, whose timing-driven choice would change the
summation order from run to run).

``grouped_conv2d`` is ``F.conv2d`` without bias or dilation, any stride and zero padding, on CUDA
(or, for tests, Triton's CPU interpreter: ``TRITON_INTERPRET=1`` set before this module is imported).
It and its two gradients are the custom operators ``fl_core::grouped_conv2d*``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# the sizes vary with the layer and the batch; not compiling a kernel per value of them
_SIZES = ["M", "HS", "WS", "HD", "WD"]


@triton.jit(do_not_specialize=_SIZES)
def _conv_kernel(src, w, dst, M, HS, WS, HD, WD, CR, CO,
                 ssn, ssc, ssh, ssw, swg, swc, swo, swr, sws, sdn, sdc, sdh, sdw,
                 R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dst[n, g*CO + o, hd, wd] = sum over (r, s, c) of src[n, g*CR + c, hs, ws] w[g, c, o, r, s] (``w`` at
    ``g*swg + c*swc + o*swo + r*swr + s*sws``) where hs = hd*STRIDE - PAD + r and ws likewise: a
    convolution; TRANSPOSED, where hd = hs*STRIDE - PAD + r: a convolution's input gradient, src
    the output gradient. Rows are dst's pixels, columns its channels, the reduction (r, s, channel block)."""
    g = tl.program_id(2)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    n = (rows // (HD * WD)).to(tl.int64)
    hd = (rows // WD) % HD
    wd = rows % WD
    src = src + g * CR * ssc
    w = w + g * swg
    blocks = tl.cdiv(CR, BK)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k in range(0, R * S * blocks):
        rs = k // blocks
        r = rs // S
        s = rs % S
        chans = (k % blocks) * BK + tl.arange(0, BK)
        if TRANSPOSED:
            th = hd + PAD - r
            tw = wd + PAD - s
            hs = th // STRIDE
            ws = tw // STRIDE
            hit = (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (hs < HS) & (ws < WS)
        else:
            hs = hd * STRIDE - PAD + r
            ws = wd * STRIDE - PAD + s
            hit = (hs >= 0) & (hs < HS) & (ws >= 0) & (ws < WS)
        hit = hit & (rows < M)
        a = tl.load(src + (n * ssn + hs * ssh + ws * ssw)[:, None] + chans[None, :] * ssc,
                    mask=hit[:, None] & (chans[None, :] < CR), other=0.0)
        b = tl.load(w + chans[:, None] * swc + cols[None, :] * swo + r * swr + s * sws,
                    mask=(chans[:, None] < CR) & (cols[None, :] < CO), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    out = dst + (n * sdn + hd * sdh + wd * sdw)[:, None] + (g * CO + cols)[None, :] * sdc
    tl.store(out, acc.to(dst.dtype.element_ty), mask=(rows < M)[:, None] & (cols < CO)[None, :])


@triton.jit(do_not_specialize=["M", "H", "W", "P", "Q", "CHUNK", "SPLITS"])
def _weight_grad_kernel(dy, x, dw, M, H, W, P, Q, CIN, COUT, CHUNK, SPLITS,
                        syn, syc, syp, syq, sxn, sxc, sxh, sxw, sds, sdg, sdr, sdss, sdo, sdi,
                        R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Chunk c's part of dw[g, o, i, r, s] = sum over output pixels (n, p, q) of dy[n, g*COUT + o, p, q]
    x[n, g*CIN + i, p*STRIDE - PAD + r, q*STRIDE - PAD + s], into ``dw[c, g, r, s, o, i]`` (strides sd*),
    in the accumulator's type; rows are output channels, columns input channels, the reduction this
    chunk's pixels."""
    col_blocks = tl.cdiv(CIN, BN)
    rows = (tl.program_id(0) // col_blocks) * BM + tl.arange(0, BM)
    cols = (tl.program_id(0) % col_blocks) * BN + tl.arange(0, BN)
    r = tl.program_id(1) // S
    s = tl.program_id(1) % S
    g = tl.program_id(2) // SPLITS
    chunk = tl.program_id(2) % SPLITS
    dy = dy + g * COUT * syc
    x = x + g * CIN * sxc
    start = chunk * CHUNK
    stop = tl.minimum(start + CHUNK, M)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for m0 in range(start, stop, BK):
        pix = m0 + tl.arange(0, BK)
        n = (pix // (P * Q)).to(tl.int64)
        p = (pix // Q) % P
        q = pix % Q
        h = p * STRIDE - PAD + r
        v = q * STRIDE - PAD + s
        a = tl.load(dy + rows[:, None] * syc + (n * syn + p * syp + q * syq)[None, :],
                    mask=(rows[:, None] < COUT) & (pix[None, :] < stop), other=0.0)
        inside = (pix < stop) & (h >= 0) & (h < H) & (v >= 0) & (v < W)
        b = tl.load(x + (n * sxn + h * sxh + v * sxw)[:, None] + cols[None, :] * sxc,
                    mask=inside[:, None] & (cols[None, :] < CIN), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    out = dw + chunk * sds + g * sdg + r * sdr + s * sdss + rows[:, None] * sdo + cols[None, :] * sdi
    tl.store(out, acc, mask=(rows < COUT)[:, None] & (cols < CIN)[None, :])


def _block(size: int, low: int = 16, high: int = 128) -> int:
    """The power of two covering ``size``, within [low, high] (tl.dot needs 16 or more)."""
    return max(low, min(high, triton.next_power_of_2(size)))


def _accumulator(t: torch.Tensor) -> torch.dtype:
    """The type the kernels sum products of inputs like ``t`` in: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _arithmetic(t: torch.Tensor) -> dict:
    """The kernels' dot-product precision and accumulator type for inputs like ``t``."""
    tf32 = t.device.type == "cuda" and t.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    accumulator = tl.float64 if _accumulator(t) == torch.float64 else tl.float32
    return {"PRECISION": "tf32" if tf32 else "ieee", "ACC": accumulator}


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``x``'s memory format (channels-last or contiguous); channels-last
    also where ``x`` is both (one channel: a single client's images), so that the layers after it stay
    channels-last rather than each needing contiguous-layout kernels compiled too."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _weight_strides(weight: torch.Tensor, groups: int, order: tuple[int, ...]) -> tuple[torch.Tensor, tuple]:
    """``weight`` (G*COUT, CIN, R, S) copied so that its dimensions (g, o, i, r, s) lie in memory in
    ``order`` (the last the kernel's contiguous tile axis), and the strides of (g, o, i, r, s)."""
    cout_total, cin, r, s = weight.shape
    laid = weight.view(groups, cout_total // groups, cin, r, s).permute(order).contiguous()
    strides = dict(zip(order, laid.stride()))
    return laid, tuple(strides[d] for d in range(5))


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int):
    n, c, h, w = x.shape
    cout_total, cin, r, s = weight.shape
    p, q = (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1
    return n, h, w, p, q, cin, cout_total // groups, r, s


def _convolve(src, weight, dst, stride, padding, groups, transposed: bool):
    """``dst`` = the grouped convolution of ``src`` or, ``transposed``, its input gradient from the
    output gradient ``src``: one launch of ``_conv_kernel``."""
    cout_total, cin, r, s = weight.shape
    reduced, produced = (cout_total // groups, cin) if transposed else (cin, cout_total // groups)
    order = (0, 3, 4, 1, 2) if transposed else (0, 3, 4, 2, 1)  # dst's channels (the columns) contiguous
    weight, (swg, swo, swi, swr, sws) = _weight_strides(weight, groups, order)
    swc, swd = (swo, swi) if transposed else (swi, swo)
    m = dst.shape[0] * dst.shape[2] * dst.shape[3]
    bm, bn, bk = 128, _block(produced), _block(reduced, high=64)
    _conv_kernel[(triton.cdiv(m, bm), triton.cdiv(produced, bn), groups)](
        src, weight, dst, m, *src.shape[2:], *dst.shape[2:], reduced, produced, *_strides(src), swg, swc, swd, swr, sws,
        *_strides(dst), R=r, S=s, STRIDE=stride, PAD=padding, TRANSPOSED=transposed, BM=bm, BN=bn, BK=bk,
        **_arithmetic(src), num_warps=4, num_stages=3)
    return dst


def _weight_grad(dy, x, weight, stride, padding, groups):
    n, h, w, p, q, cin, cout, r, s = _geometry(x, weight, stride, padding, groups)
    m = n * p * q
    bm, bn, bk = _block(cout), _block(cin), 64
    tiles = triton.cdiv(cout, bm) * triton.cdiv(cin, bn) * r * s * groups
    # enough programs to fill a GPU (~2 per multiprocessor), each reducing at least 256 pixels
    splits = max(1, min(triton.cdiv(264, tiles), triton.cdiv(m, 256)))
    chunk = triton.cdiv(triton.cdiv(m, splits), bk) * bk
    splits = triton.cdiv(m, chunk)
    partial = torch.empty((splits, groups, r, s, cout, cin), device=x.device, dtype=_accumulator(x))
    grid = (triton.cdiv(cout, bm) * triton.cdiv(cin, bn), r * s, groups * splits)
    _weight_grad_kernel[grid](dy, x, partial, m, h, w, p, q, cin, cout, chunk, splits, *_strides(dy), *_strides(x),
                              *_strides(partial), R=r, S=s, STRIDE=stride, PAD=padding, BM=bm, BN=bn, BK=bk,
                              **_arithmetic(x), num_warps=4, num_stages=3)
    summed = partial[0] if splits == 1 else partial.sum(0)  # (G, R, S, COUT, CIN)
    dw = _weight_grad_output(dy, x, weight, stride, padding, groups)
    dw.view(groups, cout, cin, r, s).copy_(summed.permute(0, 3, 4, 1, 2))
    return dw


# Custom operators rather than an autograd.Function around the launches: torch.compile treats them as
# opaque calls (their fake versions give shapes and layouts) and fuses the work around them. Each
# fake version is also what allocates the real output, so the two cannot disagree.
@torch.library.custom_op("fl_core::grouped_conv2d", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    return _convolve(x, weight, _conv_output(x, weight, stride, padding, groups), stride, padding, groups,
                     transposed=False)


@_conv_op.register_fake
def _conv_output(x, weight, stride, padding, groups):
    n, _, _, p, q, _, cout, _, _ = _geometry(x, weight, stride, padding, groups)
    return _like_layout(x, (n, groups * cout, p, q))


@torch.library.custom_op("fl_core::grouped_conv2d_input_grad", mutates_args=())
def _input_grad_op(dy: torch.Tensor, weight: torch.Tensor, input_shape: list[int], stride: int, padding: int,
                   groups: int) -> torch.Tensor:
    return _convolve(dy, weight, _input_grad_output(dy, weight, input_shape, stride, padding, groups), stride,
                     padding, groups, transposed=True)


@_input_grad_op.register_fake
def _input_grad_output(dy, weight, input_shape, stride, padding, groups):
    return _like_layout(dy, tuple(input_shape))


@torch.library.custom_op("fl_core::grouped_conv2d_weight_grad", mutates_args=())
def _weight_grad_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                    groups: int) -> torch.Tensor:
    return _weight_grad(dy, x, weight, stride, padding, groups)


@_weight_grad_op.register_fake
def _weight_grad_output(dy, x, weight, stride, padding, groups):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _save_inputs(ctx, inputs, output):
    x, weight, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, groups)


def _conv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = _input_grad_op(dy, weight, list(x.shape), *ctx.geometry) if ctx.needs_input_grad[0] else None
    dw = _weight_grad_op(dy, x, weight, *ctx.geometry) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None


_conv_op.register_autograd(_conv_backward, setup_context=_save_inputs)


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                   groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, groups=groups)`` by the kernels above, under
    autocast as ``F.conv2d`` (both cast to the autocast dtype); ``x`` contiguous or channels-last,
    the output in ``x``'s layout."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"grouped_conv2d takes {', '.join(map(str, SUPPORTED_DTYPES))} inputs of one dtype, "
                        f"not {x.dtype} and {weight.dtype}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"grouped_conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not "
                         f"match groups={groups}")
    with torch.autocast(x.device.type, enabled=False):
        return _conv_op(x, weight, stride, padding, groups)
