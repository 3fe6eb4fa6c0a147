"""A fast inference module built from a :class:`~darknetpy.model.Darknet` network.

:func:`optimize` returns an :class:`OptimizedDarknet` with the same forward
contract as the model it was built from (the heads' outputs, ``(N, A*E, h, w)``
NCHW contiguous float32 in Darknet's layout, as a tuple in cfg order; or the last
layer's output for a classifier), computed faster:

* **Batch norm folded** into the convolution's weights and bias at build time,
  in float64 (as AlexeyAB's ``fuse_conv_batchnorm``), with the profile's
  formula: pjreddie ``scale / (sqrt(var) + 1e-6)``, AlexeyAB
  ``scale / sqrt(var + 1e-5)``; the bias becomes ``bias - mean * factor``.
* **Convolution + activation fused** into one oneDNN call
  (``mkldnn._convolution_pointwise`` with pre-packed weights) on the CPU, for
  linear, leaky, relu, logistic, swish, tanh, relu6, hardtan; other
  activations run in place on the convolution's output.
* **channels_last** activations between layers (what oneDNN runs fastest).
* **No per-layer Python work at run time**: the forward plan (which layer
  reads which, which outputs stay alive, which adds may run in place) is
  worked out at build time and turned into ONE straight-line Python function
  for the whole graph (see :attr:`OptimizedDarknet.code`), so a layer costs its
  kernel call and nothing else -- this is what matters for networks of many
  tiny layers such as yolo-fastest. Outputs are freed after their last use.
* ``torch.inference_mode`` around the forward.

Precision:

* ``"fp32"`` (default): the same function as the model to float32 rounding
  (folding and fused kernels change only the order of float32 operations;
  ``tests/test_optimize.py`` checks every reference case at Darknet's 1e-3).
* ``"bf16"``: weights and activations in bfloat16 (8 bits of mantissa, about
  3 significant digits), heads computed and returned in float32. Faster on
  CPUs with AVX512-BF16/AMX; differences from fp32 are visible (typically
  1e-2 relative on raw head outputs, see docs/BENCHMARKS.md) and may change
  which boxes pass a threshold. Explicit opt-in only.
* ``"fp16"``: the same in float16 (mainly for GPUs).

Layers without a fast path run their original module (``Darknet.layers[i]``)
inside the generated function, so every network works.

>>> import darknetpy, torch                                    # doctest: +SKIP
>>> from darknetpy.optimize import optimize                    # doctest: +SKIP
>>> fast = optimize(darknetpy.load("yolov3.cfg", "yolov3.weights"))  # doctest: +SKIP
>>> heads = fast(torch.rand(1, 3, 416, 416))                   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers.activations import ACTIVATIONS
from .layers.conv import Convolutional, bn_std
from .layers.heads import HeadActivation
from .layers.merge import Route, Shortcut
from .layers.misc import Identity
from .layers.pooling import Maxpool, Upsample

log = logging.getLogger("darknetpy")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fold_batchnorm(layer: Convolutional, profile: str) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of ``layer.conv`` with its batch norm folded in, float64.

    ``f = scale / std`` with the profile's divisor (:func:`~darknetpy.layers.conv.bn_std`
    of the float64 variance); ``weight' = weight * f`` (per output channel),
    ``bias' = bias - mean * f``.
    Without batch norm: the conv's own weight and bias. Shapes (O, I/g, k, k) and (O,).
    """
    w = layer.conv.weight.detach().double()
    if layer.bn is None:
        return w, layer.conv.bias.detach().double()
    bn = layer.bn
    f = bn.weight.detach().double() / bn_std(bn.running_var.detach().double(), profile)
    bias = bn.bias.detach().double() - bn.running_mean.detach().double() * f
    return w * f.view(-1, 1, 1, 1), bias


def _mkldnn_pointwise_ok(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused conv + post-op with pre-packed weights works here (and
    agrees with ``F.conv2d``) for ``dtype``, checked once on a tiny convolution."""
    if dtype in _MKLDNN_OK:
        return _MKLDNN_OK[dtype]
    ok = False
    try:
        if torch.backends.mkldnn.is_available():
            g = torch.Generator().manual_seed(0)
            w = torch.randn(8, 4, 3, 3, generator=g)
            b = torch.randn(8, generator=g)
            for n in (1, 3):
                x = torch.randn(n, 4, 9, 7, generator=g)
                ref = F.leaky_relu(F.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), 2, 1), 0.1)
                packed = _pack(w.to(dtype), [1, 1], [2, 2], [1, 1], 1, [1, 4, 9, 7])
                with torch.inference_mode():
                    out = torch.ops.mkldnn._convolution_pointwise(
                        x.to(dtype).contiguous(memory_format=torch.channels_last), packed,
                        b.to(dtype), [1, 1], [2, 2], [1, 1], 1, "leaky_relu", [0.1], "")
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                ok = out.shape == ref.shape and bool(
                    torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol))
                if not ok:
                    break
    except Exception as e:  # pragma: no cover - depends on the build
        log.debug("oneDNN fused convolution unavailable: %s", e)
        ok = False
    _MKLDNN_OK[dtype] = ok
    return ok


_MKLDNN_OK: dict = {}


def _pack(w: Tensor, padding, stride, dilation, groups, input_size) -> Tensor:
    """oneDNN's blocked weight layout for this convolution (done once, at build time)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), padding, stride, dilation,
                                                     groups, input_size)


class _Codegen:
    """Names the constants (tensors, modules) the generated source refers to."""

    def __init__(self, consts: dict[str, object]):
        self.consts = consts

    def const(self, name: str, value) -> str:
        self.consts[name] = value
        return name


def _activation_code(act: str, v: str, cg: "_Codegen") -> list[str]:
    """Statements applying activation ``act`` to variable ``v`` (in place where possible)."""
    if act == "linear":
        return []
    entry = ACTIVATIONS[act]
    if entry.inplace is not None:
        return [entry.inplace.format(v=v)]
    fn = cg.const(f"act_{act}", entry.fn)
    return [f"{v} = {fn}({v})"]


class OptimizedDarknet(nn.Module):
    """A Darknet network compiled into one straight-line forward (see :func:`optimize`).

    ``forward(x)``: as :meth:`darknetpy.Darknet.forward` (input (N, C, H, W) float in
    0..1, any float dtype; output float32 NCHW contiguous). ``iter_layers(x)``
    yields ``(i, output_i)`` for every layer (in the working dtype/memory format;
    used by :func:`darknetpy.verify.verify_model`). ``code``: the generated source.
    Attributes ``arch``, ``specs``, ``net``, ``heads``, ``profile``, ``precision``,
    ``dtype``, ``channels_last``, ``fused`` (number of convolutions with a fused
    oneDNN kernel), ``fallback`` (indices of layers running their original module).

    Built for the device the model was on; rebuild (call :func:`optimize` again)
    rather than moving it.
    """

    def __init__(self, model, precision: str = "fp32", channels_last: bool = True,
                 compile: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of "
                             f"{', '.join(PRECISIONS)}")
        self.arch = model.arch
        self.profile = model.profile
        self.heads = list(model.heads)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.device = model.device
        self.channels_last = channels_last
        if any(getattr(layer, "arithmetic", "torch") != "torch" for layer in model.layers):
            log.warning("optimize: the model uses arithmetic=%r; the optimised module uses "
                        "torch's kernels (folded batch norm) instead",
                        next(layer.arithmetic for layer in model.layers
                             if getattr(layer, "arithmetic", "torch") != "torch"))
        # original modules of the layers without a fast path (kept as submodules)
        self.modules_ = nn.ModuleList()
        self.fallback: list[int] = []
        self.fused = 0
        # torch.compile gets plain F.conv2d calls (inductor does its own fusion/packing)
        use_mkldnn = (self.device.type == "cpu" and channels_last and not compile
                      and _mkldnn_pointwise_ok(self.dtype))
        self._use_mkldnn = use_mkldnn
        self._build_consts(model)
        self._consts: dict[str, object] = {}
        self.code = self._generate(model, trace=False)
        self._fn = self._compile_source(self.code)
        self._trace_fn = self._compile_source(self._generate(model, trace=True))
        self.compiled = False
        if compile:
            self._fn = torch.compile(self._fn, dynamic=False)
            self.compiled = True

    # -- build -------------------------------------------------------------
    @property
    def specs(self):
        return self.arch.specs

    @property
    def net(self):
        return self.arch.net

    @property
    def is_detector(self) -> bool:
        return bool(self.heads)

    def _build_consts(self, model) -> None:
        """Fold, cast and (on the CPU) pack every convolution's parameters once."""
        self._conv_consts: dict[int, dict] = {}
        dev, dt = self.device, self.dtype
        for i, (spec, layer) in enumerate(zip(model.specs, model.layers)):
            if not isinstance(layer, Convolutional):
                continue
            w64, b64 = fold_batchnorm(layer, model.profile)
            w = w64.to(dev, dt)
            b = b64.to(dev, dt)
            conv = layer.conv
            info = dict(stride=list(conv.stride), padding=list(conv.padding),
                        dilation=list(conv.dilation), groups=conv.groups, act=spec.activation,
                        blur=None, fused=False)
            if self.channels_last:
                w = w.contiguous(memory_format=torch.channels_last)
            if self._use_mkldnn and ACTIVATIONS[spec.activation].onednn is not None:
                try:
                    w = _pack(w, info["padding"], info["stride"], info["dilation"],
                              info["groups"], [1, *spec.in_shape])
                    info["fused"] = True
                    self.fused += 1
                except Exception as e:  # pragma: no cover - depends on the build
                    log.debug("layer %d: no packed weights (%s)", i, e)
            info["w"], info["b"] = w, b
            if layer.blur is not None:
                bw = layer.blur.weight.detach().to(dev, dt)
                info["blur"] = dict(w=bw.contiguous(memory_format=torch.channels_last)
                                    if self.channels_last else bw,
                                    stride=list(layer.blur.stride),
                                    padding=list(layer.blur.padding), groups=layer.blur.groups)
            self._conv_consts[i] = info

    def _generate(self, model, trace: bool) -> str:
        """Source of ``forward(x)`` (or, with ``trace``, a generator of every layer's output)."""
        specs, layers = model.specs, model.layers
        n_layers = len(specs)
        cg = _Codegen(self._consts)
        cf = "torch.channels_last" if self.channels_last else "torch.contiguous_format"
        # variable of each layer's output; aliasing layers (single-input route, identity)
        # reuse their input's variable
        var: list[str] = []
        # (layer, var read) for liveness
        reads: dict[str, list[int]] = {}

        def read(i: int, v: str) -> str:
            reads.setdefault(v, []).append(i)
            return v

        body: list[tuple[int, list[str]]] = []  # per layer: statements
        prev = "x"
        outputs = set(self.heads) if self.heads else {n_layers - 1}
        for i, (spec, layer) in enumerate(zip(specs, layers)):
            out = f"t{i}"
            stmts: list[str] = []
            refs = [var[j] for j in spec.refs]
            if isinstance(layer, Convolutional) and i in self._conv_consts:
                info = self._conv_consts[i]
                wn = cg.const(f"w{i}", info["w"])
                bn = cg.const(f"b{i}", info["b"])
                src = read(i, prev)
                geo = f"{info['padding']}, {info['stride']}, {info['dilation']}, {info['groups']}"
                if info["fused"]:
                    attr, scalars = ACTIVATIONS[info["act"]].onednn
                    stmts.append(f"{out} = conv_pw({src}, {wn}, {bn}, {geo}, {attr!r}, "
                                 f"{list(scalars)!r}, '')")
                else:
                    stmts.append(f"{out} = F.conv2d({src}, {wn}, {bn}, {info['stride']}, "
                                 f"{info['padding']}, {info['dilation']}, {info['groups']})")
                    stmts += _activation_code(info["act"], out, cg)
                if info["blur"] is not None:
                    bl = info["blur"]
                    bw = cg.const(f"blur{i}", bl["w"])
                    stmts.append(f"{out} = F.conv2d({out}, {bw}, None, {bl['stride']}, "
                                 f"{bl['padding']}, 1, {bl['groups']})")
                var.append(out)
            elif isinstance(layer, Route) and layer.single:
                var.append(read(i, refs[0]))
            elif isinstance(layer, Identity) or (isinstance(layer, Maxpool) and layer.identity):
                var.append(read(i, prev))
            elif isinstance(layer, Route):
                if layer.groups > 1:
                    g, gid = layer.groups, layer.group_id
                    parts = []
                    for j, r in zip(spec.refs, refs):
                        c = specs[j].out_shape[0] // g
                        parts.append(f"{read(i, r)}.narrow(1, {gid * c}, {c})")
                    if len(parts) == 1:
                        stmts.append(f"{out} = {parts[0]}.contiguous(memory_format={cf})")
                    else:
                        stmts.append(f"{out} = torch.cat([{', '.join(parts)}], 1)")
                else:
                    stmts.append(f"{out} = torch.cat([{', '.join(read(i, r) for r in refs)}], 1)")
                var.append(out)
            elif (isinstance(layer, Shortcut) and layer.plain and len(refs) == 1
                  and specs[spec.refs[0]].out_shape == spec.in_shape):
                a, r = read(i, prev), read(i, refs[0])
                stmts.append(f"{out} = INPLACE_ADD({a}, {r})")
                stmts += _activation_code(spec.activation, out, cg)
                var.append(out)
            elif isinstance(layer, Maxpool):
                left, right, top, bottom = layer.pads
                k, s = layer.kernel, layer.stride
                src = read(i, prev)
                if left == right and top == bottom and 2 * max(left, top) <= k:
                    stmts.append(f"{out} = F.max_pool2d({src}, {k}, {list(s)}, "
                                 f"{[top, left]})")
                else:
                    m = cg.const(f"mod{i}", layer)
                    stmts.append(f"{out} = {m}({src}, [])")
                var.append(out)
            elif (isinstance(layer, Upsample) and layer.stride > 0 and layer.scale == 1.0):
                stmts.append(f"{out} = F.interpolate({read(i, prev)}, scale_factor="
                             f"{float(layer.stride)}, mode='nearest')")
                var.append(out)
            elif isinstance(layer, HeadActivation):
                src = read(i, prev)
                stmts.append(f"{out} = {src}.to(dtype=torch.float32, "
                             "memory_format=torch.contiguous_format, copy=True)")
                stmts.extend(self._head_code(i, layer, out, cg))
                var.append(out)
            else:
                # no fast path: the layer's own module, in float32 for safety
                m = cg.const(f"mod{i}", layer)
                if not trace:
                    self.fallback.append(i)
                    self.modules_.append(layer)
                src = read(i, prev)
                rl = ", ".join(f"{read(i, r)}.float()" if self.dtype != torch.float32 else
                               read(i, r) for r in refs)
                xs = f"{src}.float()" if self.dtype != torch.float32 else src
                stmts.append(f"{out} = {m}({xs}, [{rl}])")
                if self.dtype != torch.float32:
                    stmts.append(f"{out} = {out}.to(DTYPE)")
                var.append(out)
            body.append((i, stmts))
            prev = var[i]

        # liveness: the last layer reading each variable; outputs live to the end
        out_vars = {var[i] for i in outputs}
        last_read = {v: max(ls) for v, ls in reads.items()}
        lines = ["def forward(x):"]
        lines.append(f"    x = x.to(device=DEVICE, dtype=DTYPE, memory_format={cf})")
        for i, stmts in body:
            for st in stmts:
                if "INPLACE_ADD(" in st:
                    # in place when the left operand dies here and is read once by this layer
                    a = st.split("INPLACE_ADD(")[1].split(",")[0]
                    r = st.split(",")[1].strip().rstrip(")")
                    can = (not trace and a != "x" and a not in out_vars
                           and last_read.get(a) == i and a != r)
                    st = st.replace(f"INPLACE_ADD({a}, {r})",
                                    f"{a}.add_({r})" if can else f"torch.add({a}, {r})")
                lines.append("    " + st)
            if trace:
                lines.append(f"    yield {i}, {var[i]}")
            else:
                dead = sorted(v for v, last in last_read.items()
                              if last == i and v not in out_vars and v != "x"
                              and v != var[i])
                if dead:
                    lines.append(f"    del {', '.join(dead)}")
        if not trace:
            if self.heads:
                lines.append(f"    return ({''.join(var[i] + ', ' for i in self.heads)})")
            else:
                v = var[n_layers - 1]
                lines.append(f"    return {v}.to(torch.float32).contiguous()")
        return "\n".join(lines) + "\n"

    def _head_code(self, i: int, layer: HeadActivation, v: str, cg: _Codegen) -> list[str]:
        """Statements applying a head's activations to the float32 NCHW tensor ``v``."""
        simple = not layer.class_softmax and layer.tree is None
        if not simple or not layer.any_logistic:
            m = cg.const(f"mod{i}", layer)
            return [f"{v} = {m}({v}, [])"]
        lmask = layer.logistic.view(-1).tolist()
        smask = layer.scaled.view(-1).tolist()
        a, e = layer.a, layer.e
        raw = [k for k in range(e) if not lmask[k]]
        stmts = [f"_y = {v}.view({v}.shape[0], {a}, {e}, {v}.shape[2], {v}.shape[3])"]
        if raw:
            # entries kept raw (w, h): save them, sigmoid everything, put them back
            runs = _runs(raw)
            for n_, (s0, s1) in enumerate(runs):
                stmts.append(f"_r{n_} = _y[:, :, {s0}:{s1}].clone()")
            stmts.append(f"{v}.sigmoid_()")
            for n_, (s0, s1) in enumerate(runs):
                stmts.append(f"_y[:, :, {s0}:{s1}] = _r{n_}")
        else:
            stmts.append(f"{v}.sigmoid_()")
        if layer.any_scaled:
            s = layer.scale
            for s0, s1 in _runs([k for k in range(e) if smask[k]]):
                stmts.append(f"_y[:, :, {s0}:{s1}] = _y[:, :, {s0}:{s1}] * {s!r} + "
                             f"{-0.5 * (s - 1)!r}")
        return stmts

    def _compile_source(self, code: str) -> Callable:
        glb = {"torch": torch, "F": F, "DTYPE": self.dtype, "DEVICE": self.device}
        if self._use_mkldnn:
            glb["conv_pw"] = torch.ops.mkldnn._convolution_pointwise
        glb.update(self._consts)
        loc: dict = {}
        exec(compile(code, f"<darknetpy.optimize {self.arch.path}>", "exec"), glb, loc)
        return loc["forward"]

    # -- run ---------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        from .model import Darknet
        Darknet.check_input(self, x)  # only reads self.arch

    def forward(self, x: Tensor):
        self._check_input(x)
        with torch.inference_mode():
            return self._fn(x)

    def iter_layers(self, x: Tensor):
        """Yield ``(i, output_i)`` for every layer (working dtype and memory format)."""
        self._check_input(x)
        with torch.inference_mode():
            yield from self._trace_fn(x)

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Every layer's output in cfg order, float32 NCHW."""
        return [o.float().contiguous() for _, o in self.iter_layers(x)]

    def extra_repr(self) -> str:
        return (f"precision={self.precision}, channels_last={self.channels_last}, "
                f"layers={len(self.specs)}, fused_convs={self.fused}, "
                f"fallback={self.fallback}, compiled={self.compiled}")


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as half-open ranges: [2, 3, 7] -> [(2, 4), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for k in idx:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def optimize(model, *, precision: str = "fp32", channels_last: bool = True,
             compile: bool = False) -> OptimizedDarknet:
    """An inference-only, faster module with ``model``'s forward contract.

    Args:
        model: a :class:`darknetpy.Darknet` (weights loaded, on its final device).
        precision: ``"fp32"`` (exact to float32 rounding), ``"bf16"`` or ``"fp16"``
            (weights and activations in 16-bit floats, heads in float32; opt-in,
            changes results at the 1e-2 level).
        channels_last: keep activations NHWC between layers (oneDNN's fast path; the
            outputs are still NCHW contiguous).
        compile: wrap the generated forward in ``torch.compile`` (slow to compile,
            measured no faster on CPU; see docs/BENCHMARKS.md).

    Returns:
        An :class:`OptimizedDarknet`. The model's own parameters are read, not
        changed; later changes to them are not seen (optimize again).
    """
    return OptimizedDarknet(model, precision=precision, channels_last=channels_last,
                            compile=compile)


__all__ = ["optimize", "OptimizedDarknet", "fold_batchnorm", "PRECISIONS"]
