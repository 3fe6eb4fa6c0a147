"""Darknet's CPU arithmetic, bit for bit: the "darknet" arithmetic mode.

Darknet computes a convolution as ``im2col`` + ``gemm`` (``gemm.c: gemm_nn``)
and a [connected] layer as ``gemm(0, 1, ...)`` (``gemm_nt``). In both, every
output element is accumulated *sequentially* over k, in im2col row order
(input channel, kernel row, kernel column), starting from 0, each step a
float32 multiply rounded to float32 and then a float32 add (no fused
multiply-add)::

    c = 0.0f;  for (k = 0; k < K; ++k) c += a[k] * b[k];

PyTorch's convolutions (oneDNN, blocked/vectorised GEMM, FMA) sum in another
order; the results agree to float32 rounding but not bit for bit.
:func:`sequential_gemm` reproduces Darknet's order exactly; :func:`conv2d` and
:func:`linear` use it for the layers. :func:`batchnorm` and :func:`activation`
reproduce the C arithmetic around it where torch's differs in the last bit
(``normalize_cpu`` divides in double; ``leaky``'s 0.1 is a double in pjreddie
and in AlexeyAB's scalar tail). With all of them, the convolutional, route,
shortcut, maxpool and upsample layers of the reference cases with leaky/linear
activations come out bit-identical to Darknet's (detection heads, and
AlexeyAB's vectorised mish/swish/logistic, are not emulated). Opt-in, since it
is slower: ``load(..., arithmetic="darknet")`` or ``model.set_arithmetic("darknet")``.

Speed (CPU): the outputs are split into tiles of :data:`TILE` elements; for
each tile, k is taken in chunks: one ``torch.mul`` writes all products of the
chunk (each rounded to float32), the running sum is added to the first, and
``numpy.add.reduce`` over the chunk axis adds the rest in order (numpy reduces
an outer axis row by row: sequential, one rounding per add; this is checked
once at run time by :func:`numpy_kernel_ok`, else a per-k torch loop is used).
Groups (depthwise convs) are a batch dimension of the same calls; the longer
output dimension is kept innermost; tiles are shared by :func:`default_threads`
Python threads (numpy and torch release the GIL). ``torch.addcmul_`` is *not*
usable: on the CPU it fuses into an FMA, which rounds once instead of twice.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: modes of :attr:`arithmetic` on layers that have a gemm: torch's own kernels,
#: or Darknet's sequential order (this module).
ARITHMETIC_MODES = ("torch", "darknet")

#: outputs per tile of the CPU kernel: its accumulator stays in the core's cache
#: while the whole k loop runs over it.
TILE = 4096

#: a tile's innermost (contiguous) extent is at least this (when the output has
#: it), for long vector loops; the rest of the tile is rows, which reuse each
#: loaded chunk of the column operand.
MIN_INNER = 256

#: products per k-chunk of the CPU kernel (tile outputs x chunk of k): the
#: scratch buffer of one multiply and one reduction call. Below torch's
#: intra-op grain (32768) so that torch never forks threads inside a worker.
CHUNK = 32767

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_numpy_ok: bool | None = None


def check_arithmetic(mode: str) -> str:
    """``mode`` if it is one of :data:`ARITHMETIC_MODES`, else ValueError."""
    if mode not in ARITHMETIC_MODES:
        raise ValueError(f"unknown arithmetic {mode!r}; expected one of "
                         f"{', '.join(map(repr, ARITHMETIC_MODES))}")
    return mode


def default_threads() -> int:
    """Worker threads of the CPU kernel: ``$DARKNETPY_GEMM_THREADS``, else torch's
    intra-op thread count up to 8 (numpy and torch release the GIL inside each call,
    but the Python between calls does not scale further)."""
    env = os.environ.get("DARKNETPY_GEMM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, torch.get_num_threads()))


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="darknetpy-gemm")
            _pool_size = n
        return _pool


def _split(n: int, size: int) -> list[slice]:
    """``range(n)`` in about-equal slices of at most ``size``."""
    parts = -(-n // max(1, size))
    step = -(-n // parts)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _tiles(g: int, r: int, q: int, tile: int) -> list[tuple[slice, slice, slice]]:
    """Split outputs (G, R, Q) into blocks of about ``tile`` elements: Q (innermost)
    into pieces of at least :data:`MIN_INNER`, then R, then G."""
    qs = _split(q, max(min(MIN_INNER, tile), tile // max(1, r)))
    qt = qs[0].stop - qs[0].start
    rs = _split(r, max(1, tile // qt))
    rt = rs[0].stop - rs[0].start
    gs = _split(g, max(1, tile // (rt * qt)))
    return [(gi, ri, qi) for gi in gs for ri in rs for qi in qs]


def _numpy_tile(a: np.ndarray, b: np.ndarray, out: np.ndarray, chunk: int) -> None:
    """``out (G, R, Q)`` = sequential sum over k of ``a[k] (G, R) x b[k] (G, Q)``.

    Per chunk of k: all products at once (``torch.mul``, faster than numpy's
    broadcasting multiply; each product rounded), the running sum added to the
    chunk's first product, then ``np.add.reduce`` over the chunk axis — the
    outermost axis of a C-contiguous array, which numpy reduces row after row
    (``acc += p[k]``), i.e. sequentially in k. (Over an innermost axis numpy
    would sum pairwise: a block of one element goes one k at a time.)
    """
    k = a.shape[0]
    shape = out.shape
    n = out.size
    acc = np.zeros(shape, dtype=out.dtype)
    kc = 1 if n == 1 else max(1, min(k, chunk // n))
    p = np.empty((kc,) + shape, dtype=out.dtype)
    p0, p_t = p[0], torch.from_numpy(p)
    # chunks of the (K, G, R, 1) and (K, G, 1, Q) views sharing the arrays' memory
    a_c = torch.from_numpy(a)[..., None].split(kc)
    b_c = torch.from_numpy(b)[:, :, None, :].split(kc)
    mul, add, reduce = torch.mul, np.add, np.add.reduce
    for ac, bc in zip(a_c, b_c):
        if ac.shape[0] != kc:  # the last, shorter chunk
            p_t = p_t[:ac.shape[0]]
            p = p[:ac.shape[0]]
        mul(ac, bc, out=p_t)        # fl(a * b)
        add(p0, acc, out=p0)        # fl(acc + p0)
        reduce(p, axis=0, out=acc)  # fl(fl(.. + p1) + p2) ...
    out[...] = acc


def _torch_tile(a: Tensor, b: Tensor, out: Tensor) -> None:
    """As :func:`_numpy_tile` with one multiply and one in-place add per k (any device)."""
    acc = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    tmp = torch.empty_like(acc)
    a_k = a.unsqueeze(-1).unbind(0)  # a[k] -> (G, R, 1)
    b_k = b.unsqueeze(2).unbind(0)   # b[k] -> (G, 1, Q)
    mul, add = torch.mul, acc.add_
    for ak, bk in zip(a_k, b_k):
        mul(ak, bk, out=tmp)  # rounded
        add(tmp)              # then added: two roundings, as Darknet (no FMA)
    out.copy_(acc)


def _reference_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain loop of :func:`_numpy_tile`'s contract, for the self-check."""
    acc = np.zeros((a.shape[1], a.shape[2], b.shape[2]), dtype=a.dtype)
    for k in range(a.shape[0]):
        acc = acc + a[k][:, :, None] * b[k][:, None, :]
    return acc


def numpy_kernel_ok() -> bool:
    """Whether this numpy reduces an outer axis sequentially (checked once, on values
    whose pairwise and sequential float32 sums differ); else the torch loop is used."""
    global _numpy_ok
    if _numpy_ok is None:
        k = 64
        # 1e8 then ones: sequentially every +1 is lost, summed pairwise they are not
        col = np.ones(k, dtype=np.float32)
        col[0] = 1e8
        ok = True
        for g, r, q in [(1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 3, 5), (2, 2, 3)]:
            a = np.broadcast_to(col[:, None, None], (k, g, r)).copy()
            b = np.ones((k, g, q), dtype=np.float32)
            out = np.empty((g, r, q), dtype=np.float32)
            for chunk in (k * g * r * q, 8 * g * r * q):
                _numpy_tile(a, b, out, chunk)
                ok = ok and np.array_equal(out, _reference_sum(a, b)) and out.flat[0] == 1e8
        _numpy_ok = ok
    return _numpy_ok


def sequential_gemm(a: Tensor, b: Tensor, *, tile: int = TILE, chunk: int = CHUNK,
                    threads: int | None = None) -> Tensor:
    """Batched matrix product in Darknet's order: ``c[g] = a[g] @ b[g]``.

    ``a`` (G, M, K), ``b`` (G, K, L) -> ``c`` (G, M, L), where every element is
    ``c = 0; for k in 0..K-1: c = fl(c + fl(a[g, m, k] * b[g, k, l]))`` in ``a``'s
    dtype — exactly ``gemm_nn`` of Darknet's ``gemm.c`` for each group (and,
    with ``b`` = the transposed input, ``gemm_nt`` of ``[connected]``).
    2-D ``a`` (M, K) and ``b`` (K, L) give a 2-D (M, L). Inference only (no autograd).

    On the CPU the work is split into blocks of ``tile`` outputs, each run over
    k in chunks of ``chunk`` products (:func:`_numpy_tile`), the blocks shared
    by ``threads`` threads (default :func:`default_threads`); elsewhere (or if
    :func:`numpy_kernel_ok` fails) one torch multiply and add per k. None of
    this changes the result.
    """
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a[None], b[None]
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"sequential_gemm: shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "do not multiply")
    if a.dtype != b.dtype:
        raise ValueError(f"sequential_gemm: dtypes {a.dtype} and {b.dtype} differ")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise ValueError("darknet arithmetic is for inference only (no autograd); "
                         "run under torch.no_grad() or torch.inference_mode()")
    g, m, k = a.shape
    l = b.shape[2]
    out = torch.empty((g, m, l), dtype=a.dtype, device=a.device)
    if out.numel() == 0 or k == 0:
        out.zero_()
        return out[0] if squeeze else out
    # both operands k-major: a_k (K, G, M), b_k (K, G, L); the longer output
    # dimension goes innermost (for L < M compute c^T = b^T a^T: float
    # multiplication is commutative, so every step rounds identically)
    a_k, b_k = a.permute(2, 0, 1), b.permute(1, 0, 2)
    if l >= m:
        rows, cols, view = a_k.contiguous(), b_k.contiguous(), out
    else:
        rows, cols, view = b_k.contiguous(), a_k.contiguous(), out.transpose(1, 2)
    use_numpy = (a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
                 and numpy_kernel_ok())
    if not use_numpy:
        _torch_tile(rows, cols, view)
        return out[0] if squeeze else out
    rows_np, cols_np, view_np = rows.numpy(), cols.numpy(), view.numpy()
    blocks = _tiles(view.shape[0], view.shape[1], view.shape[2], max(1, int(tile)))
    jobs = [(rows_np[:, gs, rs], cols_np[:, gs, qs], view_np[gs, rs, qs], int(chunk))
            for gs, rs, qs in blocks]
    n_threads = min(len(jobs), default_threads() if threads is None else max(1, int(threads)))
    if n_threads == 1:
        for job in jobs:
            _numpy_tile(*job)
    else:
        for f in [_executor(n_threads).submit(_numpy_tile, *job) for job in jobs]:
            f.result()
    return out[0] if squeeze else out


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, **kwargs) -> Tensor:
    """``F.conv2d`` computed as Darknet does: im2col, then :func:`sequential_gemm` per group.

    ``x`` (N, C, H, W), ``weight`` (M, C/groups, kh, kw) -> (N, M, out_h, out_w).
    The k order is Darknet's im2col row order (channel, kernel row, kernel
    column) = ``F.unfold``'s; padding contributes zeros. ``bias`` (M,) is then
    added (Darknet's ``add_bias``). ``kwargs`` go to :func:`sequential_gemm`.
    """
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    n, c, h, w = x.shape
    m, cg, kh, kw = weight.shape
    if cg * groups != c or m % groups:
        raise ValueError(f"conv2d: weight {tuple(weight.shape)} with groups={groups} "
                         f"does not fit input channels {c}")
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if (kh, kw, stride, padding) == (1, 1, (1, 1), (0, 0)):
        cols = x.reshape(n, c, h * w)  # Darknet's 1x1 shortcut: the input is the matrix
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    k = cg * kh * kw
    sp = out_h * out_w
    # (N, G*K, S) -> (G, K, N*S): the batch joins the spatial (independent) dimension
    cols = cols.reshape(n, groups, k, sp).permute(1, 2, 0, 3).reshape(groups, k, n * sp)
    a = weight.reshape(groups, m // groups, k)
    y = sequential_gemm(a, cols, **kwargs)  # (G, M/G, N*S)
    y = y.reshape(m, n, sp).transpose(0, 1).reshape(n, m, out_h, out_w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def conv2d_module(conv: torch.nn.Conv2d, x: Tensor, **kwargs) -> Tensor:
    """:func:`conv2d` with an ``nn.Conv2d``'s weight, bias and geometry (zero padding only)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("darknet arithmetic supports numeric zero padding only")
    return conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                  conv.groups, **kwargs)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, **kwargs) -> Tensor:
    """``F.linear`` as Darknet's ``forward_connected_layer``: ``gemm(0, 1, ...)``.

    ``x`` (N, in), ``weight`` (out, in) -> (N, out); each output is
    ``sum = 0; for k: sum += x[k] * w[k]`` in order (``gemm_nt`` as written in C),
    then ``bias`` is added. (An ``-Ofast`` build may vectorise that reduction into
    partial sums; no reference case has a [connected] layer to tell.)
    """
    y = sequential_gemm(weight, x.t().contiguous(), **kwargs).t()  # (out, N) -> (N, out)
    if bias is not None:
        y = y + bias
    return y


def batchnorm(x: Tensor, bn) -> Tensor:
    """Darknet's inference batch norm with its C arithmetic (``blas.c: normalize_cpu``,
    ``scale_bias``, ``add_bias``).

    ``bn``: a :class:`darknetpy.layers.conv.DarknetBatchNorm`; ``x`` (N, C, ...).
    ``normalize_cpu`` divides by the *double* ``sqrt()``, so the quotient is
    computed in double and rounded to float once::

        alexeyab: x = (float)((double)(x - mean) / sqrt((double)(var + .00001f)))
        pjreddie: x = (float)((double)(x - mean) / (sqrt((double)var) + (double).000001f))

    then ``x *= scale; x += bias`` in float32. (A float32 ``(x - mean) / sqrtf(...)``
    differs from this in the last bit for ~20% of the elements.)
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    std = bn.std(sqrt_dtype=torch.float64, c_float_eps=True).detach()
    mean, scale, bias = (t.detach().view(shape) for t in (bn.running_mean, bn.weight, bn.bias))
    if _numpy_path(x):  # numpy: single-threaded, fewer temporaries than torch here
        q = np.subtract(x.detach().numpy(), mean.numpy()).astype(np.float64)
        np.divide(q, std.view(shape).numpy(), out=q)
        y = q.astype(x.numpy().dtype)
        y *= scale.numpy()
        y += bias.numpy()
        return torch.from_numpy(y)
    y = ((x - mean).double() / std.view(shape)).to(x.dtype)
    return y * scale + bias


def _numpy_path(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _double_leaky(x: Tensor) -> Tensor:
    """``(x > 0) ? x : .1 * x`` with a double 0.1, rounded back to ``x``'s dtype."""
    if _numpy_path(x):
        xn = x.detach().numpy()
        neg = (xn.astype(np.float64) * 0.1).astype(xn.dtype)
        return torch.from_numpy(np.where(xn > 0, xn, neg))
    return torch.where(x > 0, x, (x.double() * 0.1).to(x.dtype))


def _avx_main_length(n: int) -> int:
    """Elements AlexeyAB's AVX loop ``for (i = 0; i < n - 8; i += 8)`` covers; the
    scalar loop does the rest (1 to 8 elements)."""
    return 0 if n <= 8 else 8 * -(-(n - 8) // 8)


def activation(x: Tensor, act, profile: str, *, vector_loop: bool = True) -> Tensor:
    """``act`` (an :class:`~darknetpy.layers.activations.Activation`) applied to ``x``
    (N, ...) with Darknet's C arithmetic where it differs from torch's in the last bit:

    * ``leaky``, pjreddie: ``(x > 0) ? x : .1 * x`` — a *double* 0.1, so
      ``(float)((double)x * 0.1)``;
    * ``leaky``, AlexeyAB, ``vector_loop=True`` (``activate_array_cpu_custom``, used
      by [convolutional]): an AVX loop with ``0.1f * x`` in float over each image's
      output except its last 1..8 elements, which a scalar loop computes with the
      double ``.1 * x``; ``vector_loop=False`` (``activate_array``: [connected]):
      ``.1f * x`` throughout.

    Other activations are ``act(x)`` unchanged.
    """
    if act.name != "leaky":
        return act(x)
    if profile == "pjreddie":
        return _double_leaky(x)
    y = torch.where(x > 0, x, x * 0.1)  # float32 0.1f * x
    if vector_loop and x.dim() > 0 and x.numel():
        flat_x, flat_y = x.reshape(x.shape[0], -1), y.reshape(x.shape[0], -1)
        start = _avx_main_length(flat_x.shape[1])
        flat_y[:, start:] = _double_leaky(flat_x[:, start:])
        y = flat_y.view(x.shape)
    return y


__all__ = ["ARITHMETIC_MODES", "CHUNK", "TILE", "activation", "batchnorm", "check_arithmetic",
           "conv2d", "conv2d_module", "default_threads", "linear", "numpy_kernel_ok",
           "sequential_gemm"]
