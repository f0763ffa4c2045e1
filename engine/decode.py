"""The decode step's layer loop without per-module Python: one new token per row, no autograd.

At batch 1 SmolLM2's 30 layers ran ~100 PyTorch ops each through ~15 Python calls (modules, fused-weight lookups,
kernel choice, freshness checks), and once our kernels (:mod:`engine.kernels`) read the weights near the memory
bandwidth that overhead was half of a step. A :class:`DecodeRunner` resolves everything that is fixed between
steps once: each projection's kernel and weights (int8 copy, packed copy or plain weight, for the row count of the
step), the norms, the attention op. A step is then ~8 op calls per layer (the residual adds ride in the
projections' epilogues).

When every projection runs one of our kernels (panels, row-form or int8; the usual case once :mod:`engine.prepack`
has measured), the whole step is one op, ``scratchchat::decode_blocks``, which runs the same kernels in the same
order in C++ (the ~240 Python-side calls of a SmolLM2 step cost ~2 ms of ~20); otherwise the Python loop below runs.
Where the head is one of those kernels too, GPT.forward's whole decode step is one op, ``scratchchat::decode_step``:
the embedding, the blocks, the final norm, the head and a bf16 head's refined top logits (the forward's Python
around the blocks cost ~0.3 ms of a ~7 ms GPT-2 step, 3-4% of its tokens/s).

It computes exactly what the module path computes (the same ops on the same tensors; tests compare logits and
tokens bit for bit, for the one-op form and the Python loop). What it resolved is keyed by every tensor it reads
(data pointer and in-place version) and every int8 or packed copy it uses (identity), and by the module types: a
LoRA merge or unmerge, a requantization, a repack, a ``load_state_dict``, ``model.to(...)`` or a peft wrapper makes
it rebuild on the next step, never run stale. The check before each step is cheap while no module anywhere has
registered a parameter, buffer or submodule since the last full check (torch's global registration hooks count
them; a replaced parameter or a peft wrapper registers): then the tensors' data pointers and versions are read in
one C++ pass (``torch.classes.scratchchat.Watch``) and only the copies' identities in Python. Otherwise, and
under ``torch.__future__``'s overwrite-on-conversion (``model.to`` then replaces parameters without registering),
every slot is looked up again (~0.7 ms a step for SmolLM2 in the serving thread). GPT.forward uses it for decode
steps when our kernels are available, with per-request adapters too (a hook with ``decode`` and ``pieces`` methods,
as the scheduler's :class:`engine.lora.BatchLora`); prefill and training run the modules.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine import prepack
from engine.linear import FusedLinears, is_plain_linear
from engine.prepack import PackedWeight
from engine.quant import Int8Weight, int8_rows

ops = torch.ops.scratchchat

# how many parameters, buffers and submodules any nn.Module has registered so far (module assignment, a new
# Parameter, ``register_buffer``): a resolved step re-checks every slot only after one of these
_registrations = [0]


def _registered(*_args: object) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)
nn.modules.module.register_module_module_registration_hook(_registered)


def _watch(tensors: list[torch.Tensor]) -> object | None:
    """A :class:`Watch` of ``tensors`` (our kernels' C++ class), or None without our kernels."""
    try:
        return torch.classes.scratchchat.Watch(tensors)
    except (AttributeError, RuntimeError):
        return None


def _with_residual(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda x, residual: f(x) if residual is None else residual + f(x)


class Product:
    """A projection's kernel bound to its weights: ``p(x)`` or, with a float32 residual, ``residual + p(x)`` (our
    kernels add it in their epilogue: one op less). ``spec`` is how :func:`decode_blocks` runs the same kernel
    ((kind, N, weight, bias, scale); kinds: 0 our row-form kernel, 1 panels, 2 int8, 3 bf16 dot-product
    panels, 4 int8 dot-product panels), None for PyTorch's kernels."""

    __slots__ = ("run", "spec")

    def __init__(self, run: Callable[..., torch.Tensor], spec: tuple | None = None) -> None:
        self.run, self.spec = run, spec

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(x, residual)


def product(weight: torch.Tensor, bias: torch.Tensor | None, w8: Int8Weight | None, packed: PackedWeight | None,
            rows: int, sources: list[torch.Tensor]) -> Product:
    """The kernel :func:`engine.linear.linear_q` would pick for ``rows`` rows, bound to its weights."""
    n = weight.shape[0]
    pw = None if packed is None else packed.for_rows(rows)
    plain_bias = bias
    # our kernels add the bias in float32: widened once here (exactly), not in every call (GPT-2 bf16: 48 a step)
    bias = None if bias is None else bias.float()
    if pw is not None and (w8 is None or pw.scale is not None) and pw.fresh(sources):
        if pw.kernel == "panel":  # float32 / bf16 panels, or int8 ones with their scale
            panels, scale = pw.packed, pw.scale
            return Product(lambda x, residual: ops.linear_panel(x, panels, n, scale, bias, residual),
                           (1, n, panels, bias, scale))
        if pw.kernel == "scratch":
            return Product(lambda x, residual: ops.linear(x, weight, bias, residual), (0, n, weight, bias, None))
        if pw.kernel == "dpbf16":  # bf16 dot-product panels (AVX512-BF16)
            panels = pw.packed
            return Product(lambda x, residual: ops.linear_dpbf16(x, panels, n, bias, residual),
                           (3, n, panels, bias, None))
        if pw.kernel == "dpi8":  # int8 dot-product panels (AVX512-VNNI), with their scale
            panels, scale = pw.packed, pw.scale
            return Product(lambda x, residual: ops.linear_dpi8(x, panels, n, scale, bias, residual),
                           (4, n, panels, bias, scale))
        return Product(_with_residual(lambda x: prepack.packed_linear(x, pw, plain_bias)))
    if w8 is not None and rows <= int8_rows():
        q, scale = w8
        return Product(lambda x, residual: ops.linear_i8(x, q, scale, bias, residual), (2, n, q, bias, scale))
    if rows == 1:
        if plain_bias is None:
            return Product(_with_residual(lambda x: torch.mv(weight, x[0]).unsqueeze(0)))
        return Product(_with_residual(lambda x: torch.addmv(plain_bias, weight, x[0]).unsqueeze(0)))
    return Product(_with_residual(lambda x: F.linear(x, weight, plain_bias)))


class _Keys:
    """Where a resolved step reads its inputs from: parameter slots (watched by data pointer and in-place version)
    and attribute slots for int8 and packed copies (watched by identity). Re-reading the slots, not the objects
    read at build time, also catches a replaced parameter (``model.to(...)``) or copy."""

    def __init__(self) -> None:
        self.params: list[tuple[dict, str]] = []  # (module._parameters, name)
        self.attrs: list[tuple[dict, str]] = []  # (obj.__dict__, name)

    def _param(self, module: nn.Module, *names: str) -> None:
        self.params += [(module._parameters, n) for n in names if module._parameters.get(n) is not None]

    def linear(self, lin: nn.Linear, rows: int) -> Product:
        d = lin.__dict__
        self._param(lin, "weight", "bias")
        self.attrs += [(d, "int8"), (d, "packed")]
        return product(lin.weight, lin.bias, d.get("int8"), d.get("packed"), rows, [lin.weight])

    def fused(self, f: FusedLinears, rows: int) -> Product:
        weight, bias = f.get()
        for lin in f.linears:
            self._param(lin, "weight", "bias")
            self.attrs.append((lin.__dict__, "int8"))
        self.attrs.append((f.__dict__, "packed"))
        return product(weight, bias, f.int8(), f.packed, rows, f.sources())

    def norm(self, module: nn.Module) -> None:
        self._param(module, "weight", "bias")

    def key(self) -> tuple:
        tensors = tuple((t.data_ptr(), t._version) for t in (d[n] for d, n in self.params))
        return tensors, tuple(self.copies())  # the copies themselves, compared by identity

    def copies(self) -> Iterator[object]:
        return (d.get(n) for d, n in self.attrs)

    def tensors(self) -> list[torch.Tensor]:
        return [d[n] for d, n in self.params]


class Norm:
    """A block's norm bound to its weights; ``spec`` is (kind, weight, bias, eps) for :func:`decode_blocks` (kinds:
    0 RMSNorm, 1 LayerNorm with a float32 output, 2 LayerNorm with a bf16 output)."""

    __slots__ = ("run", "spec")

    def __init__(self, module: nn.Module, keys: _Keys) -> None:
        w, eps = module.weight, module.eps
        keys.norm(module)
        if hasattr(module, "bias"):  # LayerNorm (GPT-2): float32 math, output in the weights' dtype
            b = module.bias
            kind = {torch.float32: 1, torch.bfloat16: 2}.get(w.dtype) if b is None or b.dtype == w.dtype else None
            if kind is None:  # (float16, or a bias cast apart from its weight: the module's own math)
                self.run, self.spec = module, None
            else:  # the module's op in inference (engine.model.LayerNorm)
                self.run = lambda x: ops.layer_norm(x, w, b, eps)
                self.spec = (kind, w, b, eps)
        else:
            self.run = lambda x: ops.rms_norm(x, w, eps)
            self.spec = (0, w, None, eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


REFINE_K = 8  # a bf16 head's top logits recomputed in float32 (engine.linear.refine_top_logits' default)
SLOTS, META = 32, 12  # per layer in decode_blocks' tensors and meta (engine/csrc/kernels.cpp)
LORA_SLOTS = {"qkv": 16, "o_proj": 17, "up": 18, "down_proj": 19}  # each the pieces table of the lora op


class DecodeRunner:
    """The blocks of a frozen GPT, resolved for decode steps of ``rows`` rows (see the module doc)."""

    def __init__(self, model: nn.Module, rows: int) -> None:
        self.rows = rows
        keys = _Keys()
        self.layers = []
        self.sizes: list[tuple[list[int], list[int] | None]] = []  # fused q/k/v and gate/up output sizes per layer
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            qkv = attn._fused_qkv()
            gate_up = mlp._fused_gate_up() if mlp.swiglu else None
            if qkv is None or (mlp.swiglu and gate_up is None) or not is_plain_linear(attn.o_proj) \
                    or not is_plain_linear(mlp.down_proj) or not (mlp.swiglu or is_plain_linear(mlp.up_proj)):
                raise ValueError("a projection is wrapped or trainable: decode through the modules")
            up = keys.fused(gate_up, rows) if gate_up is not None else keys.linear(mlp.up_proj, rows)
            self.layers.append((attn.layer_idx, attn.n_heads, Norm(block.attn_norm, keys), keys.fused(qkv, rows),
                                keys.linear(attn.o_proj, rows), Norm(block.mlp_norm, keys), up,
                                keys.linear(mlp.down_proj, rows), mlp.swiglu))
            self.sizes.append((qkv.sizes, gate_up.sizes if gate_up is not None else None))
        if any(t.is_inference() for t in keys.tensors()):  # made under inference_mode: no version counter to watch
            raise ValueError("inference tensors cannot be watched for in-place changes: decode through the modules")
        # the projection modules where they are registered (a peft wrapper replaces them)
        self.modules = [(part._modules, name, m) for b in model.blocks for part in (b.attn, b.mlp)
                        for name, m in part._modules.items()]
        self.modules += [(model._modules, name, model._modules.get(name)) for name in ("tok_emb", "pos_emb", "norm_f",
                                                                                  "lm_head")]
        self.head = self._head(model, keys, rows)
        self.blocks = list(model.blocks)
        self._keys = keys
        # the copies' slots as two lists, looked up by map(dict.get, ...) in C (a generator's bytecode per slot cost
        # ~40 us more a step, cold)
        self._copy_dicts, self._copy_names = [d for d, _ in keys.attrs], [n for _, n in keys.attrs]
        self._seen = _registrations[0]
        self.key = keys.key()
        self._watch = _watch(keys.tensors())
        self._fuse()
        head, self.head = self.head, None
        if head is not None and self.meta is not None and head[3] == self.eps:
            self.head = head[:3]  # decode_step runs the blocks' one-op form, with one eps for every norm
        self._with_lora: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hook -> its tensors list

    def _fuse(self) -> None:
        """The tensors and ints of :func:`decode_blocks` (one op for every block) when each projection runs one of
        our kernels and every norm shares one eps; else ``self.meta`` is None and the loop below runs."""
        self.tensors: list[torch.Tensor | None] = []
        self.meta: list[int] | None = []
        eps = set()
        for _, heads, norm1, qkv, o, norm2, up, down, swiglu in self.layers:
            prods = (qkv, o, up, down)
            if norm1.spec is None or norm2.spec is None or any(p.spec is None for p in prods):
                self.meta = None
                return
            eps |= {norm1.spec[3], norm2.spec[3]}
            layer: list[torch.Tensor | None] = [norm1.spec[1], norm1.spec[2]]
            for p in prods[:2]:
                layer += p.spec[2:]
            layer += [norm2.spec[1], norm2.spec[2]]
            for p in prods[2:]:
                layer += p.spec[2:]
            self.tensors += layer + [None] * (SLOTS - len(layer))
            self.meta += [heads, norm1.spec[0], int(swiglu)] + [v for p in prods for v in p.spec[:2]] + [0]
        if len(eps) != 1:
            self.meta = None
            return
        self.eps = float(eps.pop())

    def _head(self, model: nn.Module, keys: _Keys, rows: int) -> tuple | None:
        """What :func:`decode_step` needs beyond the blocks, as GPT.forward picks it: ([token embedding, position
        embedding or None], [final norm weight, bias, head weight or panels, bias, scale, bf16 weight to refine],
        [norm kind, product kind, n, refine k], the final norm's eps); None where the forward's own Python tail
        must run (a wrapped head, a kernel decode_step cannot run, a float16 head)."""
        d = model.__dict__
        keys._param(model.tok_emb, "weight")
        if model.pos_emb is not None:
            keys._param(model.pos_emb, "weight")
        keys.attrs += [(d, "head_int8"), (d, "head_packed")]
        norm = Norm(model.norm_f, keys)
        head_int8, lm_head = d.get("head_int8"), model.lm_head
        if lm_head is None:
            weight, bias, w8, packed = model.tok_emb.weight, None, head_int8, d.get("head_packed")
        elif is_plain_linear(lm_head):
            ld = lm_head.__dict__
            keys._param(lm_head, "weight", "bias")
            keys.attrs += [(ld, "int8"), (ld, "packed")]
            weight, packed = lm_head.weight, ld.get("packed")
            bias, w8 = (None, head_int8) if head_int8 is not None else (lm_head.bias, ld.get("int8"))
        else:
            return None
        prod = product(weight, bias, w8, packed, rows, [weight])
        out_dtype = {0: model.norm_f.weight.dtype, 1: torch.float32, 2: torch.bfloat16}.get(
            norm.spec[0] if norm.spec else -1)
        if weight.dtype == torch.float32:
            k = 0
        elif weight.dtype == torch.bfloat16 and out_dtype == torch.bfloat16:
            k = REFINE_K
        else:
            return None
        if prod.spec is None or norm.spec is None:
            return None
        pos = model.pos_emb.weight if model.pos_emb is not None else None
        return ([model.tok_emb.weight, pos], [norm.spec[1], norm.spec[2], *prod.spec[2:], weight],
                [norm.spec[0], prod.spec[0], prod.spec[1], k], norm.spec[3])

    def logits(self, idx: torch.Tensor, cache: object, plan: object, lora: object = None) -> torch.Tensor | None:
        """The whole step in one op (:func:`decode_step`): ``idx`` (B,) tokens in, (B, vocab) logits out, as
        GPT.forward computes them; None where it cannot (the forward then runs the blocks with ``__call__``)."""
        if self.head is None:
            return None
        pos, (cos, sin) = plan.decode_positions, plan.decode_tables
        emb, head, head_meta = self.head
        if lora is None:
            return ops.decode_step(idx, emb, self.tensors, self.meta, cache.keys, cache.values, pos, cos, sin, None,
                                   [], [], self.eps, head, head_meta)
        return ops.decode_step(idx, emb, self._lora_tensors(lora), self.meta, cache.keys, cache.values, pos, cos,
                               sin, lora.coef_for(len(idx)), lora.a, lora.b, self.eps, head, head_meta)

    def _lora_tensors(self, lora: object) -> list[torch.Tensor | None]:
        """The tensors list with ``lora``'s pieces tables in each layer's LoRA slots (built once per hook)."""
        got = self._with_lora.get(lora)
        if got is None:
            got = list(self.tensors)
            for (i, *_, swiglu), (qkv_sizes, gu_sizes) in zip(self.layers, self.sizes, strict=True):
                for name, sizes, slot in (("qkv", qkv_sizes, "qkv"), ("o_proj", None, "o_proj"),
                                          ("gate_up" if swiglu else "up_proj", gu_sizes, "up"),
                                          ("down_proj", None, "down_proj")):
                    pk = lora.pieces(i, name, sizes)
                    if pk is not None:
                        got[i * SLOTS + LORA_SLOTS[slot]] = pk.table
            self._with_lora[lora] = got
        return got

    def valid(self, model: nn.Module) -> bool:
        """Still what ``model`` computes: the same tensors, unchanged, the same copies and projection modules (a
        peft wrapper replaces them). The fast form while nothing has registered since the last full check (see the
        module doc)."""
        if self._watch is not None and self._seen == _registrations[0] \
                and not torch.__future__.get_overwrite_module_params_on_conversion():
            copies = map(dict.get, self._copy_dicts, self._copy_names)
            return self._watch.unchanged() and all(map(operator.is_, copies, self.key[1]))
        seen = _registrations[0]
        current = self._keys.key()
        ok = current[0] == self.key[0] and all(a is b for a, b in zip(current[1], self.key[1], strict=True)) \
            and len(model.blocks) == len(self.blocks) and all(map(operator.is_, model.blocks, self.blocks)) \
            and all(d.get(n) is m for d, n, m in self.modules)
        if ok:  # every slot holds what it held at build: the fast check is sound again until the next registration
            self._seen = seen
        return ok

    def __call__(self, x: torch.Tensor, cache: object, plan: object, lora: object = None) -> torch.Tensor:
        """``x`` (B, D) float32 residual stream in, out after every block; the cache rows are written in place.
        ``lora``: a per-request hook with ``group`` and ``decode`` methods (:class:`engine.lora.BatchLora`),
        applied where the modules apply it."""
        pos, (cos, sin) = plan.decode_positions, plan.decode_tables
        if self.meta is not None:  # every block in one op
            if lora is None:
                return ops.decode_blocks(x, self.tensors, self.meta, cache.keys, cache.values, pos, cos, sin, None,
                                         [], [], self.eps)
            return ops.decode_blocks(x, self._lora_tensors(lora), self.meta, cache.keys, cache.values, pos, cos, sin,
                                     lora.coef_for(len(x)), lora.a, lora.b, self.eps)
        if lora is not None:
            return self._adapted(x, cache, plan, lora)
        keys, values = cache.keys, cache.values
        attend, silu_mul, gelu = ops.decode_attention, ops.silu_mul, ops.gelu_tanh
        for i, heads, norm1, qkv, o, norm2, up, down, swiglu in self.layers:
            y = attend(qkv(norm1(x)), keys[i], values[i], pos, cos, sin, heads)
            x = o(y, x)  # x + o_proj(y)
            h = up(norm2(x))
            x = down(silu_mul(h) if swiglu else gelu(h), x)  # (engine.model.gelu_tanh at inference)
        return x

    def _adapted(self, x: torch.Tensor, cache: object, plan: object, lora: object) -> torch.Tensor:
        pos, (cos, sin) = plan.decode_positions, plan.decode_tables
        keys, values = cache.keys, cache.values
        attend, silu_mul, gelu, delta = ops.decode_attention, ops.silu_mul, ops.gelu_tanh, lora.decode
        for (i, heads, norm1, qkv, o, norm2, up, down, swiglu), (qkv_sizes, gu_sizes) in zip(self.layers, self.sizes,
                                                                                          strict=True):
            h = norm1(x)
            y = attend(delta(i, "qkv", h, qkv(h), sizes=qkv_sizes), keys[i], values[i], pos, cos, sin, heads)
            x = delta(i, "o_proj", y, o(y), x)  # x + (o_proj(y) + its delta), as the modules add them
            h = norm2(x)
            if swiglu:
                a = silu_mul(delta(i, "gate_up", h, up(h), sizes=gu_sizes))
            else:
                a = gelu(delta(i, "up_proj", h, up(h)))
            x = delta(i, "down_proj", a, down(a), x)
        return x


class _Runners(dict):
    """A model's runners by row count; a deep copy of the model starts without (they are bound to its tensors)."""

    def __deepcopy__(self, memo: dict) -> _Runners:
        return _Runners()


def runner_for(model: nn.Module, rows: int) -> DecodeRunner | None:
    """The model's runner for ``rows``-row steps, rebuilt when it went stale; None where the modules must run."""
    runners: dict[int, DecodeRunner] = model.__dict__.setdefault("_decode_runners", _Runners())
    runner = runners.get(rows)
    if runner is not None and runner.valid(model):
        return runner
    try:
        runners[rows] = runner = DecodeRunner(model, rows)
    except ValueError:
        runners.pop(rows, None)
        return None
    return runner
