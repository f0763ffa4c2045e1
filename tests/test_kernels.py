"""Our AVX2 decode kernels (engine/csrc/kernels.cpp via engine.kernels) against plain-torch float64 references:
linear, linear_i8 and linear_panel (float32 / bf16 / int8 panels) over rows 1-9 and ragged K/N, the per-request
LoRA op, decode_attention (RoPE, cache write at each row's position,
MHA/GQA/MQA), rms_norm, layer_norm and silu_mul in float32 and bf16, clear errors, and SCRATCHCHAT_KERNELS=off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.config import ModelConfig
from engine.lora import pack_decode_piece
from engine.model import build_rope_cache
from engine.quant import quantize_rows

pytestmark = pytest.mark.skipif(not kernels.cpu_supported(), reason="the kernels need an AVX2/FMA CPU")

ops = torch.ops.scratchchat
ROWS, KS, NS = (1, 2, 3, 4, 5, 8, 9), (3, 13, 40, 77, 576), (1, 7, 33, 130)
BF16_ULP = 2.0 ** -7  # bf16 keeps 8 significant bits: one rounding is within this relative step


@pytest.fixture(scope="module", autouse=True)
def _load_kernels() -> None:
    kernels.available()  # builds or loads the library so torch.ops.scratchchat exists; test_kernels_build asserts


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_within(y: torch.Tensor, ref: torch.Tensor, atol: torch.Tensor | float, rtol: float, what: str) -> None:
    """|y - ref| <= atol + rtol |ref| elementwise (atol may be a per-element bound, e.g. |x| @ |w|.T)."""
    err = (y.double() - ref).abs()
    bound = atol + rtol * ref.abs()
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert bool((err <= bound).all()), f"{what}: max excess {(err - bound).max().item():.3g}"


def test_kernels_build_and_load_on_an_avx2_cpu() -> None:
    assert kernels.available() is True
    assert hasattr(torch.ops.scratchchat, "decode_attention")


def _check_product(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, b64: torch.Tensor | None, what: str) -> None:
    """y (in x's dtype) against x @ w.T + b in float64: float32 accumulation error scaled by |x| @ |w|.T, plus one
    bf16 rounding of the output when x is bf16."""
    x64 = x.double()
    ref = F.linear(x64, w64, b64)
    scale = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    assert y.dtype == x.dtype, what
    _assert_within(y, ref, 2e-6 * scale + 1e-30, BF16_ULP if x.dtype == torch.bfloat16 else 0.0, what)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64_reference_over_rows_and_ragged_shapes(x_dtype, w_dtype, with_bias) -> None:
    g = _gen(0)
    for K in KS:
        for N in NS:
            w = torch.randn(N, K, generator=g).to(w_dtype)
            b = torch.randn(N, generator=g).to(w_dtype) if with_bias else None
            for R in ROWS:
                x = torch.randn(R, K, generator=g).to(x_dtype)
                y = ops.linear(x, w, b)
                _check_product(y, x, w.double(), None if b is None else b.double(), f"R={R} K={K} N={N}")


def test_bf16_inputs_widen_and_outputs_round_exactly_as_pytorch_does() -> None:
    """The kernels widen a bf16 input and round a bf16 output themselves: the same bits as ``.float()`` on the way
    in and ``.to(torch.bfloat16)`` (round to nearest even) on the way out, for every kernel form."""
    g = _gen(11)
    x = (torch.randn(5, 96, generator=g) * 3).bfloat16()
    w = torch.randn(37, 96, generator=g)
    panels = kernels.pack_panels(w)
    q, scale = quantize_rows(w)
    pairs = [(ops.linear(x, w, None, None), ops.linear(x.float(), w, None, None)),
             (ops.linear_panel(x, panels, 37), ops.linear_panel(x.float(), panels, 37)),
             (ops.linear_i8(x, q, scale, None, None), ops.linear_i8(x.float(), q, scale, None, None))]
    for got, wide in pairs:
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))


def test_linear_wrapper_takes_leading_dims_and_non_contiguous_inputs() -> None:
    g = _gen(1)
    w = torch.randn(40, 13, generator=g).t()  # (13, 40) -> a transposed (N=13, K=40) view
    x = torch.randn(2, 3, 80, generator=g)[..., ::2]  # (2, 3, 40), strided
    y = kernels.linear(x, w, torch.ones(13))
    assert y.shape == (2, 3, 13)
    _check_product(y.reshape(6, 13), x.reshape(6, 40), w.double(), torch.ones(13, dtype=torch.float64), "wrapper")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_residual_epilogue_equals_adding_the_rounded_output(x_dtype, rows) -> None:
    """y = residual + linear(x) in float32, with linear's output rounded to x's dtype first: exactly what the decode
    loop's ``x = x + o_proj(y)`` computes without the epilogue."""
    g = _gen(11)
    x = torch.randn(rows, 40, generator=g).to(x_dtype)
    w, b = torch.randn(33, 40, generator=g), torch.randn(33, generator=g)
    res = torch.randn(rows, 33, generator=g)
    got = ops.linear(x, w, b, res)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, res + ops.linear(x, w, b).float(), rtol=0, atol=0)
    q, scale = quantize_rows(w)
    torch.testing.assert_close(ops.linear_i8(x, q, scale, b, res), res + ops.linear_i8(x, q, scale, b).float(),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="residual"):
        ops.linear(x, w, b, res[:, :5])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_i8_matches_dequantized_float64_reference(x_dtype, with_bias) -> None:
    g = _gen(2)
    for K in KS:
        for N in NS:
            q, scale = quantize_rows(torch.randn(N, K, generator=g))
            w64 = q.double() * scale.double()[:, None]
            b = torch.randn(N, generator=g) if with_bias else None
            for R in ROWS:
                x = torch.randn(R, K, generator=g).to(x_dtype)
                y = kernels.linear_i8(x, q, scale, b)
                _check_product(y, x, w64, None if b is None else b.double(), f"R={R} K={K} N={N}")


def test_linear_i8_takes_bf16_scales_and_leading_dims() -> None:
    g = _gen(3)
    q, scale = quantize_rows(torch.randn(33, 77, generator=g).bfloat16())
    assert scale.dtype == torch.bfloat16
    x = torch.randn(2, 2, 77, generator=g)
    y = kernels.linear_i8(x, q, scale)
    assert y.shape == (2, 2, 33)
    _check_product(y.reshape(4, 33), x.reshape(4, 77), q.double() * scale.double()[:, None], None, "bf16 scales")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_panel_matches_float64_reference_over_rows_and_ragged_shapes(x_dtype, w_dtype, with_bias) -> None:
    g = _gen(20)
    for K in KS:
        for N in NS:
            if w_dtype == torch.int8:
                w, scale = quantize_rows(torch.randn(N, K, generator=g))
                w64 = w.double() * scale.double()[:, None]
            else:
                w, scale = torch.randn(N, K, generator=g).to(w_dtype), None
                w64 = w.double()
            panels = kernels.pack_panels(w)
            assert panels.shape == (-(-N // 8), K, 8) and panels.dtype == w.dtype
            b = torch.randn(N, generator=g) if with_bias else None
            for R in ROWS:
                x = torch.randn(R, K, generator=g).to(x_dtype)
                y = kernels.linear_panel(x, panels, N, b, scale=scale)
                _check_product(y, x, w64, None if b is None else b.double(), f"R={R} K={K} N={N}")


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_linear_panel_rows_do_not_depend_on_the_other_rows_of_the_step(w_dtype) -> None:
    """Each output is one FMA chain over k whatever tile computes it: a row's result is bit for bit the same alone
    or batched with 1-8 others (the scheduler's batched == single in greedy mode)."""
    g = _gen(21)
    w = torch.randn(45, 96, generator=g)
    w, scale = quantize_rows(w) if w_dtype == torch.int8 else (w.to(w_dtype), None)
    panels = kernels.pack_panels(w)
    x = torch.randn(9, 96, generator=g)
    alone = torch.cat([kernels.linear_panel(x[i : i + 1], panels, 45, scale=scale) for i in range(9)])
    for R in range(2, 10):
        torch.testing.assert_close(kernels.linear_panel(x[:R], panels, 45, scale=scale), alone[:R], rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_panel_residual_epilogue_equals_adding_the_rounded_output(x_dtype) -> None:
    g = _gen(22)
    x = torch.randn(5, 40, generator=g).to(x_dtype)
    w, b = torch.randn(35, 40, generator=g), torch.randn(35, generator=g)
    res = torch.randn(5, 35, generator=g)
    panels = kernels.pack_panels(w)
    got = kernels.linear_panel(x, panels, 35, b, residual=res)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, res + kernels.linear_panel(x, panels, 35, b).float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="residual"):
        ops.linear_panel(x, panels, 35, None, b, res[:, :5])
    with pytest.raises(RuntimeError, match="do not fill 5 panels"):
        ops.linear_panel(x, panels, 41, None, None, None)
    with pytest.raises(RuntimeError, match="x has 40 features but the panels take 39"):
        ops.linear_panel(x, kernels.pack_panels(torch.randn(35, 39)), 35, None, None, None)
    with pytest.raises(RuntimeError, match="int8 panels need their per-feature scale"):
        ops.linear_panel(x, kernels.pack_panels(quantize_rows(w)[0]), 35, None, None, None)


AVX512_BF16 = kernels.cpu_supported() and kernels.available() and kernels.has_avx512_bf16()
needs_avx512_bf16 = pytest.mark.skipif(not AVX512_BF16, reason="bf16 dot-product panels run on AVX512-BF16 CPUs only")


@needs_avx512_bf16
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dpbf16_matches_float64_reference_over_rows_and_ragged_shapes(with_bias) -> None:
    """bf16 x and weights, vdpbf16ps pairs over k (odd K pads a zero pair), N not a multiple of the 16-feature
    panel: every output is the float64 product's within float32 accumulation and one bf16 rounding."""
    g = _gen(23)
    for K in KS:
        for N in NS:
            w = torch.randn(N, K, generator=g).bfloat16()
            panels = kernels.pack_dpbf16(w)
            assert panels.shape == (-(-N // 64), -(-K // 2), 64, 2) and panels.dtype == torch.bfloat16
            b = torch.randn(N, generator=g) if with_bias else None
            for R in ROWS:
                x = torch.randn(R, K, generator=g).bfloat16()
                y = kernels.linear_dpbf16(x, panels, N, b)
                _check_product(y, x, w.double(), None if b is None else b.double(), f"R={R} K={K} N={N}")


@needs_avx512_bf16
def test_linear_dpbf16_rows_do_not_depend_on_the_other_rows_and_residual_adds_the_rounded_output() -> None:
    g = _gen(24)
    w, b = torch.randn(45, 96, generator=g).bfloat16(), torch.randn(45, generator=g).bfloat16()
    panels = kernels.pack_dpbf16(w)
    x = torch.randn(9, 96, generator=g).bfloat16()
    alone = torch.cat([kernels.linear_dpbf16(x[i : i + 1], panels, 45, b) for i in range(9)])
    for R in range(2, 10):
        torch.testing.assert_close(kernels.linear_dpbf16(x[:R], panels, 45, b), alone[:R], rtol=0, atol=0)
    res = torch.randn(9, 45, generator=g)
    got = kernels.linear_dpbf16(x, panels, 45, b, residual=res)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, res + alone.float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        ops.linear_dpbf16(x.float(), panels, 45, None, None)
    with pytest.raises(RuntimeError, match="do not fill 1 panel groups of 64"):
        ops.linear_dpbf16(x, panels, 65, None, None)
    with pytest.raises(RuntimeError, match="x has 94 features but the panels take 96"):
        ops.linear_dpbf16(x[:, :94], panels, 45, None, None)
    with pytest.raises(ValueError, match="for bfloat16 weights"):
        kernels.pack_dpbf16(w.float())


@needs_avx512_bf16
def test_linear_dpbf16_many_rows_chunked_over_k_equal_each_row_alone() -> None:
    """From 8 rows the 4-row sets take a group's k pairs chunk by chunk (a ragged last chunk at K=77; up to 64 rows,
    then sets whole, then single rows): every row still gets exactly its own one-row bits."""
    g = _gen(27)
    K, N = 77, 130
    w = torch.randn(N, K, generator=g).bfloat16()
    panels = kernels.pack_dpbf16(w)
    x = torch.randn(71, K, generator=g).bfloat16()
    alone = torch.cat([kernels.linear_dpbf16(x[i : i + 1], panels, N) for i in range(71)])
    _check_product(alone, x, w.double(), None, "rows alone")
    for R in (8, 13, 64, 71):
        torch.testing.assert_close(kernels.linear_dpbf16(x[:R], panels, N), alone[:R], rtol=0, atol=0, msg=f"R={R}")


AVX512_VNNI = kernels.cpu_supported() and kernels.available() and kernels.has_avx512_vnni()
needs_avx512_vnni = pytest.mark.skipif(not AVX512_VNNI, reason="int8 dot-product panels run on AVX512-VNNI CPUs only")
VNNI_QMAX = 32639  # 127 * 256 + 127: the activations' 16-bit grid (two signed byte limbs)


def _dpi8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """linear_dpi8's definition in plain torch: each row of x quantized to round(x * (32639 / max|x|)) in float32
    (half to even), the integer products summed exactly (float64 holds them), the sum rounded to float32 and scaled
    by the row's step max|x| / 32639, then by the feature's scale, plus the bias, in x's dtype."""
    xf = x.float()
    top = xf.abs().amax(dim=1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    qx = torch.round(xf * (torch.full_like(safe, VNNI_QMAX) / safe)) * (top > 0)  # (not VNNI_QMAX / safe: a reciprocal)
    exact = qx.double() @ q.double().T
    y = exact.float() * (top / VNNI_QMAX) * scale.float()
    return (y if b is None else y + b.float()).to(x.dtype)


@needs_avx512_vnni
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dpi8_is_its_definition_bit_for_bit_and_near_the_float64_product(with_bias) -> None:
    """int8 weights in the VNNI panel layout over rows 1-9 and ragged K/N: the kernel computes exactly what its
    definition (_dpi8_reference) does, and that lies within the activations' quantization (half a step of
    max|x| / 32639 per entry, times |w|) and float32/bf16 rounding of bf16 x times the dequantized weight."""
    g = _gen(25)
    for K in KS:
        for N in NS:
            q, scale = quantize_rows(torch.randn(N, K, generator=g))
            panels = kernels.pack_dpi8(q)
            assert panels.shape == (-(-N // 64), -(-K // 4), 64, 4) and panels.dtype == torch.uint8
            w64 = q.double() * scale.double()[:, None]
            b = torch.randn(N, generator=g) if with_bias else None
            for R in ROWS:
                x = torch.randn(R, K, generator=g).bfloat16()
                x[0, 0] = 0.0  # (a zero entry quantizes to a zero limb pair)
                y = kernels.linear_dpi8(x, panels, N, scale, b)
                what = f"R={R} K={K} N={N}"
                torch.testing.assert_close(y, _dpi8_reference(x, q, scale, b), rtol=0, atol=0, msg=what)
                x64 = x.double()
                step = x64.abs().amax(dim=1, keepdim=True) / VNNI_QMAX
                quantization = 0.5 * step * w64.abs().sum(dim=1)[None, :]
                scale_bound = F.linear(x64.abs(), w64.abs(), None if b is None else b.abs().double())
                ref = F.linear(x64, w64, None if b is None else b.double())
                _assert_within(y, ref, quantization + 2e-6 * scale_bound + 1e-30, BF16_ULP, what)


@needs_avx512_vnni
def test_linear_dpi8_rows_are_independent_of_each_other_and_of_the_tiling() -> None:
    """Rows go two at a time, then one, through exact integer sums: every row gets its one-row bits at any row
    count (1-71, the prefill chunk sizes included), whatever the other rows hold (scales 1e-3 to 1e3)."""
    g = _gen(27)
    K, N = 77, 130
    q, scale = quantize_rows(torch.randn(N, K, generator=g))
    panels = kernels.pack_dpi8(q)
    x = (torch.randn(71, K, generator=g) * torch.logspace(-3, 3, 71)[:, None]).bfloat16()
    alone = torch.cat([kernels.linear_dpi8(x[i : i + 1], panels, N, scale) for i in range(71)])
    torch.testing.assert_close(alone, _dpi8_reference(x, q, scale, None), rtol=0, atol=0)
    for R in (2, 3, 8, 13, 64, 71):
        torch.testing.assert_close(kernels.linear_dpi8(x[:R], panels, N, scale), alone[:R], rtol=0, atol=0,
                                   msg=f"R={R}")


@needs_avx512_vnni
def test_linear_dpi8_extremes_non_finite_rows_residual_and_errors() -> None:
    """-128 and 127 weights at the longest K where the int32 sums cannot overflow give the definition's bits; a
    zero row gives zeros (plus bias), a row holding Inf or NaN gives NaN without touching the other rows; the
    residual adds the rounded output; bad inputs get clear errors."""
    g = _gen(26)
    K = 4096
    q = torch.randint(-128, 128, (45, K), generator=g, dtype=torch.int8)
    q[0], q[1] = -128, 127
    scale = torch.rand(45, generator=g) + 0.5
    panels = kernels.pack_dpi8(q)
    x = torch.randn(9, K, generator=g).bfloat16()
    x[2] = x[2].abs()  # every limb pair at its largest with q[1]: the sums' extreme
    x[2, 0] = 1.0e4
    torch.testing.assert_close(kernels.linear_dpi8(x, panels, 45, scale), _dpi8_reference(x, q, scale, None),
                               rtol=0, atol=0)
    special = x[:4].clone()
    special[1] = 0.0
    special[2, 5] = float("inf")
    special[3, 7] = float("nan")
    b = torch.randn(45, generator=g)
    y = kernels.linear_dpi8(special, panels, 45, scale, b)
    torch.testing.assert_close(y[0], kernels.linear_dpi8(x[:1], panels, 45, scale, b)[0], rtol=0, atol=0)
    torch.testing.assert_close(y[1], b.bfloat16(), rtol=0, atol=0)
    assert y[2:].isnan().all()
    alone = torch.cat([kernels.linear_dpi8(x[i : i + 1], panels, 45, scale) for i in range(9)])
    res = torch.randn(9, 45, generator=g)
    got = kernels.linear_dpi8(x, panels, 45, scale, residual=res)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, res + alone.float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        ops.linear_dpi8(x.float(), panels, 45, scale, None, None)
    with pytest.raises(RuntimeError, match="scale has 44 entries, not 45"):
        ops.linear_dpi8(x, panels, 45, scale[:44], None, None)
    with pytest.raises(RuntimeError, match="x has 4092 features but the panels take 4096"):
        ops.linear_dpi8(x[:, :4092], panels, 45, scale, None, None)
    with pytest.raises(RuntimeError, match="takes the uint8 panels of pack_dpi8"):
        ops.linear_dpi8(x, kernels.pack_dpbf16(q.bfloat16()), 45, scale, None, None)
    with pytest.raises(RuntimeError, match="takes bfloat16 panels"):
        ops.linear_dpbf16(x, panels, 45, None, None)
    with pytest.raises(ValueError, match="for int8 weights"):
        kernels.pack_dpi8(q.bfloat16())
    wide = torch.zeros(1, 65540, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 65536 input features"):
        ops.linear_dpi8(wide, kernels.pack_dpi8(torch.zeros(1, 65540, dtype=torch.int8)), 1, scale[:1], None, None)


@needs_avx512_vnni
@pytest.mark.parametrize("R", [1, 3, 8])
def test_dot_product_panels_give_the_same_bits_on_any_thread_count(R) -> None:
    """Every output is one chain on one thread whichever thread takes its group (SmolLM2's 576 features: nine
    groups, 5 and 4 on two threads, 3 each on three): 1, 2 and 3 threads give the same bits, for bf16 and int8
    panels, with a bias and a residual."""
    g = _gen(28)
    K, N = 576, 576
    w = torch.randn(N, K, generator=g)
    q, scale = quantize_rows(w)
    bf, i8 = kernels.pack_dpbf16(w.bfloat16()), kernels.pack_dpi8(q)
    b = torch.randn(N, generator=g)
    x = torch.randn(R, K, generator=g).bfloat16()
    res = torch.randn(R, N, generator=g)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append((kernels.linear_dpbf16(x, bf, N, b), kernels.linear_dpi8(x, i8, N, scale, b, residual=res)))
    finally:
        torch.set_num_threads(threads)
    for bf_y, i8_y in got[1:]:
        torch.testing.assert_close(bf_y, got[0][0], rtol=0, atol=0)
        torch.testing.assert_close(i8_y, got[0][1], rtol=0, atol=0)
    _check_product(got[1][0], x, w.bfloat16().double(), b.double(), "dpbf16")
    torch.testing.assert_close(got[1][1], res + _dpi8_reference(x, q, scale, b).float(), rtol=0, atol=0)


def _lora_reference(x, y, pieces_list, coef, residual=None):
    """float64: y + sum over each row's pieces of coef * B^T-form products; pieces_list holds (A (r, in), Bt (r, n),
    out offset, contribution)."""
    d = torch.zeros(y.shape, dtype=torch.float64)
    for a, bt, off, j in pieces_list:
        t = (x.double() @ a.double().T) * coef[:, j : j + 1].double()  # (R, r)
        d[:, off : off + bt.shape[1]] += t @ bt.double()
    out = y.double() + d
    return out if residual is None else residual.double() + out


def _lora_args(pieces_list, contributions, dtype=torch.float32):
    """Each contribution's flat A and B buffers as engine.lora packs them for the op (its pieces stored one after
    another, with a gap of unrelated values in between, as an adapter stores other layers' pieces) and the op's
    pieces table."""
    a = [[torch.randn(5)] for _ in range(contributions)]
    b = [[torch.randn(3)] for _ in range(contributions)]
    table = []
    for at, bt, off, j in pieces_list:
        r, n = bt.shape
        a_at, b_at = sum(t.numel() for t in a[j]), sum(t.numel() for t in b[j])
        table.append([a_at, r, off, n, b_at, j])
        ap, bp = pack_decode_piece(at, bt, pairs=dtype == torch.bfloat16)
        a[j] += [ap, torch.randn(7)]
        b[j] += [bp, torch.randn(2)]
    return ([torch.cat(t).to(dtype) for t in a], [torch.cat(t).to(dtype) for t in b],
            torch.tensor(table, dtype=torch.int64))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("copies", [1, 4], ids=["decode-rows", "prompt-rows"])
def test_lora_op_adds_each_rows_own_pieces(x_dtype, y_dtype, with_residual, w_dtype, copies) -> None:
    """A fused output (sizes 40 | 13 | 13) with three contributions of ranks 4, 8, 2 on different slices; rows use
    none, one, or one plus a negative (merged) one; coef 0 rows get exactly y back. Adapter weights in float32 or
    (a bf16 base's) bf16, widened exactly. Five rows (a decode step's: the op shares out blocks of outputs) or 20
    (a prompt's: it shares out rows)."""
    g = _gen(30)
    K = 37
    sizes = [(0, 40), (40, 13), (53, 13)]
    pieces_list = []
    for j, r in enumerate((4, 8, 2)):
        for off, n in sizes[: 3 - j]:
            a_, b_ = torch.randn(r, K, generator=g), torch.randn(r, n, generator=g)
            pieces_list.append((a_.to(w_dtype).float(), b_.to(w_dtype).float(), off, j))
    coef = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, -1]]).repeat(copies, 1)
    R = coef.shape[0]
    x = torch.randn(R, K, generator=g).to(x_dtype)
    y = torch.randn(R, 66, generator=g).to(y_dtype)
    res = torch.randn(R, 66, generator=g) if with_residual else None
    a, flat, table = _lora_args(pieces_list, coef.shape[1], w_dtype)
    got = ops.lora(x, y, a, flat, table, coef, res)
    assert got.dtype == (torch.float32 if with_residual else y_dtype)
    ref = _lora_reference(x, y, pieces_list, coef, res)
    scale = _lora_reference(x.abs(), y.abs(), [(p[0].abs(), p[1].abs(), p[2], p[3]) for p in pieces_list],
                            coef.abs(), None if res is None else res.abs())
    # y + delta is rounded into y's dtype before the residual add (as the module path adds it)
    rounding = BF16_ULP * _lora_reference(x, y, pieces_list, coef).abs() if y_dtype == torch.bfloat16 else 0.0
    _assert_within(got, ref, 4e-6 * scale + rounding + 1e-30, 0.0, "lora")
    if not with_residual:
        torch.testing.assert_close(got[0], y[0], rtol=0, atol=0)  # a row without an adapter: y untouched


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("rows", [6, 13])
def test_lora_op_rows_alone_equal_rows_together(w_dtype, rows) -> None:
    """Rows with one adapter are computed four at a time (each weight loaded once for them): every row's delta is
    bit for bit what the row alone gets, for a decode step's row count (blocks of outputs) and a prompt's (rows),
    an odd input width and a rank that is not a multiple of 8."""
    g = _gen(32)
    K, N = 29, 70
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(w_dtype).float()

    pieces_list = [(w(6, K), w(6, 50), 0, 0), (w(3, K), w(3, 20), 50, 0)]
    a, flat, table = _lora_args(pieces_list, 1, w_dtype)
    x = torch.randn(rows, K, generator=g).bfloat16()
    y = torch.randn(rows, N, generator=g).bfloat16()
    coef = torch.ones(rows, 1)
    coef[rows - 1] = -1.0  # the last row alone in its group
    together = ops.lora(x, y, a, flat, table, coef, None)
    alone = torch.cat([ops.lora(x[i : i + 1], y[i : i + 1], a, flat, table, coef[i : i + 1], None)
                       for i in range(rows)])
    assert torch.equal(together.view(torch.int16), alone.view(torch.int16))
    assert not torch.equal(together, y)


@pytest.mark.parametrize("with_residual", [False, True])
def test_lora_op_rounds_y_plus_delta_exactly_as_pytorch_does(with_residual) -> None:
    """The output's float sum y + delta rounded to bf16 (vectorized 8 at a time, the tail one by one): ties to
    even both ways, a denormal delta, NaN, and outputs past a multiple of 8, bit for bit what
    ``(y.float() + delta).bfloat16()`` gives. Rank 1, x = 1 and A = 1, so the delta is B's column exactly."""
    N = 21
    y = torch.tensor([1.0, 1.0078125, -1.0, -1.0078125, 3.0, float("nan"), 0.0, 2.0] * 2 + [1.0078125] * 5)
    y = y.bfloat16()
    delta = torch.tensor([2.0**-8, 2.0**-8, -(2.0**-8), -(2.0**-8), 2.0**-7, 1.0, 2.0**-140, 2.0**-7] * 2
                         + [2.0**-8] * 5)
    x = torch.ones(1, 1)
    a, flat, table = _lora_args([(torch.ones(1, 1), delta[None], 0, 0)], 1)
    res = torch.randn(1, N, generator=_gen(31)) if with_residual else None
    got = ops.lora(x, y[None], a, flat, table, torch.ones(1, 1), res)
    want = (y.float() + delta).bfloat16()[None]
    if with_residual:
        torch.testing.assert_close(got, res + want.float(), rtol=0, atol=0, equal_nan=True)
    else:  # NaN stays NaN (its payload is c10::BFloat16's canonical one, PyTorch's vector path keeps the input's)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_lora_op_rejects_pieces_outside_its_tensors() -> None:
    x, y, coef = torch.randn(2, 8), torch.randn(2, 10), torch.ones(2, 1)
    a, flat = [torch.randn(64)], [torch.randn(128)]  # rank 4 packs as 8 (x 8 inputs), 10 outputs as 16 (x 8 ranks)
    ok = torch.tensor([[0, 4, 0, 10, 0, 0]])
    ops.lora(x, y, a, flat, ok, coef, None)
    for bad, msg in (([1, 4, 0, 10, 0, 0], r"past a\[0\]'s 64 values"), ([0, 4, 1, 10, 0, 0], "past y's 10 outputs"),
                     ([0, 4, 0, 10, 1, 0], r"past b\[0\]'s 128 values"), ([0, 4, 0, 10, 0, 1], "contribution 1 of 1")):
        with pytest.raises(RuntimeError, match=msg):
            ops.lora(x, y, a, flat, torch.tensor([bad]), coef, None)
    with pytest.raises(RuntimeError, match="float32"):
        ops.lora(x, y, [a[0].bfloat16()], flat, ok, coef, None)
    with pytest.raises(RuntimeError, match="1 contributions but there are 2 a"):
        ops.lora(x, y, a * 2, flat * 2, ok, coef, None)


def _rope_like_model(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """engine.model's _apply_rope_rolled on (..., hd) rows with the tables in x's dtype, as the prefill path rounds."""
    half = x.shape[-1] // 2
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    signed = torch.cat([-s[..., :half], s[..., half:]], dim=-1)
    return x * c + x.roll(half, dims=-1) * signed


def _decode_reference(qkv, kc, vc, positions, tables, H):
    """(output in float64, expected k cache, expected v cache): RoPE, cache write, causal softmax attention."""
    B, Hkv, _, hd = kc.shape
    q = qkv[:, : H * hd].view(B, H, hd)
    k = qkv[:, H * hd : (H + Hkv) * hd].view(B, Hkv, hd)
    v = qkv[:, (H + Hkv) * hd :].view(B, Hkv, hd)
    if tables is not None:
        cos, sin = tables[0][positions][:, None], tables[1][positions][:, None]  # (B, 1, hd)
        q, k = _rope_like_model(q, cos, sin), _rope_like_model(k, cos, sin)
    k_exp, v_exp = kc.clone(), vc.clone()
    out = torch.empty(B, H, hd, dtype=torch.float64)
    for b, p in enumerate(positions.tolist()):
        k_exp[b, :, p], v_exp[b, :, p] = k[b], v[b]
        for h in range(H):
            g = h // (H // Hkv)
            keys, vals = k_exp[b, g, : p + 1].double(), v_exp[b, g, : p + 1].double()
            att = torch.softmax(keys @ q[b, h].double() / math.sqrt(hd), dim=0)
            out[b, h] = att @ vals
    return out.view(B, H * hd), k_exp, v_exp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rope", [True, False])
@pytest.mark.parametrize("H,Hkv,hd", [(4, 4, 16), (6, 2, 24), (4, 1, 30)], ids=["mha", "gqa", "mqa"])
def test_decode_attention_matches_reference_and_writes_only_each_rows_position(dtype, with_rope, H, Hkv, hd) -> None:
    g, B, S = _gen(4), 3, 16
    positions = torch.tensor([0, 5, 11])
    config = ModelConfig(vocab_size=16, context_length=S, d_model=H * hd, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                         ffn_dim=8, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
    tables = build_rope_cache(config) if with_rope else None
    qkv = torch.randn(B, (H + 2 * Hkv) * hd, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, S, hd, generator=g).to(dtype)  # stale values everywhere: a stray write shows
    vc = torch.randn(B, Hkv, S, hd, generator=g).to(dtype)
    ref, k_exp, v_exp = _decode_reference(qkv, kc, vc, positions, tables, H)
    y = ops.decode_attention(qkv, kc, vc, positions, *(tables or (None, None)), H)
    assert y.dtype == dtype and y.shape == (B, H * hd)
    # RoPE rounds as the PyTorch path does (no FMA contraction), so the cache matches it bit for bit
    torch.testing.assert_close(kc, k_exp, rtol=0, atol=0)
    torch.testing.assert_close(vc, v_exp, rtol=0, atol=0)
    if dtype == torch.float32:
        _assert_within(y, ref, 1e-5, 1e-5, "float32 attention")
    else:
        _assert_within(y, ref, 2e-3, BF16_ULP, "bf16 attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "H,Hkv,hd",
    [(9, 3, 64), (4, 2, 128), (2, 1, 72), (12, 12, 64), (16, 2, 32), (4, 1, 96)],
    ids=["smollm2", "hd128", "hd72", "gpt2", "rep8-hd32", "hd96"],
)
def test_decode_attention_over_long_contexts_matches_reference(dtype, H, Hkv, hd) -> None:
    """Contexts of whole and partial 8- and 16-key blocks (up to 291 keys), head sizes of one to four 32-feature
    register chunks and a remainder, 1 to 8 query heads a kv head (bf16 on AVX512-BF16: the vdpbf16ps kernel, its
    heads three at a time): each row's attention is the reference's, and a row's output does not depend on the
    other rows."""
    g, S = _gen(6), 300
    positions = torch.tensor([0, 7, 63, 64, 84, 290])
    config = ModelConfig(vocab_size=16, context_length=S, d_model=H * hd, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                         ffn_dim=8, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=False)
    tables = build_rope_cache(config)
    qkv = torch.randn(len(positions), (H + 2 * Hkv) * hd, generator=g).to(dtype)
    kc = torch.randn(len(positions), Hkv, S, hd, generator=g).to(dtype)
    vc = torch.randn(len(positions), Hkv, S, hd, generator=g).to(dtype)
    ref, _, _ = _decode_reference(qkv, kc.clone(), vc.clone(), positions, tables, H)
    kc0, vc0 = kc.clone(), vc.clone()
    y = ops.decode_attention(qkv, kc, vc, positions, *tables, H)
    if dtype == torch.float32:
        _assert_within(y, ref, 1e-5, 1e-5, "float32 attention")
    else:
        _assert_within(y, ref, 2e-3, BF16_ULP, "bf16 attention")
    for b in range(len(positions)):  # one row alone gives the same bits
        k1, v1 = kc0[b : b + 1].clone(), vc0[b : b + 1].clone()
        y1 = ops.decode_attention(qkv[b : b + 1], k1, v1, positions[b : b + 1], *tables, H)
        assert torch.equal(y1[0], y[b])


def test_decode_attention_ignores_stale_cache_entries_past_the_position() -> None:
    g, H, hd, S = _gen(5), 2, 8, 12
    qkv = torch.randn(1, 3 * H * hd, generator=g)
    kc, vc = torch.zeros(1, H, S, hd), torch.zeros(1, H, S, hd)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, 4:], vc2[:, :, 4:] = 1e4, -1e4  # garbage after position 3 must not change the output
    pos = torch.tensor([3])
    y1 = ops.decode_attention(qkv, kc, vc, pos, None, None, H)
    y2 = ops.decode_attention(qkv, kc2, vc2, pos, None, None, H)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def _prefix_reference(q, kc, vc, positions, magnitude=False):
    """float64 softmax attention of q (B, H, T, hd) over keys 0..positions[b, t] of its group's cache rows (with
    ``magnitude``, the weights times |values|: the scale of an error made per weight)."""
    B, H, T, hd = q.shape
    rep = H // kc.shape[1]
    out = torch.empty(B, T, H, hd, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                n = int(positions[b, t]) + 1
                keys, vals = kc[b, h // rep, :n].double(), vc[b, h // rep, :n].double()
                vals = vals.abs() if magnitude else vals
                att = torch.softmax(keys @ q[b, h, t].double() / math.sqrt(hd), dim=0)
                out[b, t, h] = att @ vals
    return out.view(B, T, H * hd)


@pytest.mark.parametrize("H,Hkv,hd", [(9, 3, 64), (4, 4, 16), (6, 2, 40), (4, 1, 8)],
                         ids=["smollm2", "mha", "gqa-hd40", "mqa-hd8"])
@pytest.mark.parametrize("T", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefix_attention_matches_reference_over_ragged_positions(H, Hkv, hd, T, dtype) -> None:
    """New tokens over a cached prefix, rows at different positions, tiles of 8 query rows that straddle heads and
    leave partial tiles, queries as a strided view (the model's transposed q), keys/values as a narrowed view of a
    bigger cache: each output is the float64 reference's, and cache entries past a query's position (stale here:
    1e4) never reach it."""
    g, B, S = _gen(7), 3, 64
    positions = torch.tensor([[40], [3], [0]]) + torch.arange(T)
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)  # (B, H, T, hd), not contiguous
    kc = torch.full((B, Hkv, S + 8, hd), 1e4)
    vc = torch.full((B, Hkv, S + 8, hd), -1e4)
    for b in range(B):
        n = int(positions[b, -1]) + 1
        kc[b, :, :n] = torch.randn(Hkv, n, hd, generator=g)
        vc[b, :, :n] = torch.randn(Hkv, n, hd, generator=g)
    q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
    k, v = kc.narrow(2, 0, S), vc.narrow(2, 0, S)
    y = ops.prefix_attention(q, k, v, positions)
    assert y.shape == (B, T, H * hd) and y.dtype == dtype
    if dtype == torch.float32:
        _assert_within(y, _prefix_reference(q, k, v, positions), 1e-5, 1e-5, "prefix attention")
    else:  # bf16 inputs: exact products, float32 sums; the weights rounded to bf16 for the values' product where
        # both products run on vdpbf16ps (as SDPA rounds them in bf16), and one rounding of the output
        weights = 2.0**-8 * _prefix_reference(q, k, v, positions, magnitude=True)  # half a bf16 ulp each
        _assert_within(y, _prefix_reference(q, k, v, positions), 1e-5 + weights, BF16_ULP, "bf16 prefix attention")
    # the model's other path: SDPA with the cache plan's boolean mask
    mask = (torch.arange(S)[None, None, :] <= positions[:, :, None])[:, None]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, sdpa.transpose(1, 2).reshape(B, T, H * hd), **tol)
    for b in range(B):  # a row alone gives the same bits
        one = ops.prefix_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], positions[b : b + 1])
        assert torch.equal(one, y[b : b + 1])


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefix_attention_over_long_ragged_histories(T, dtype) -> None:
    """Rows whose histories span several of the values' pairing chunks (128 keys) and end mid-chunk, odd and even,
    next to a short row: each output is the float64 reference's and a row alone gives the same bits."""
    g, H, Hkv, hd, S = _gen(8), 9, 3, 64, 420
    positions = torch.tensor([[300], [3], [128], [255]]) + torch.arange(T)
    B = len(positions)
    q = torch.randn(B, H, T, hd, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, S, hd, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, S, hd, generator=g).to(dtype)
    y = ops.prefix_attention(q, kc, vc, positions)
    ref = _prefix_reference(q, kc, vc, positions)
    if dtype == torch.float32:
        _assert_within(y, ref, 1e-5, 1e-5, "prefix attention")
    else:
        weights = 2.0**-8 * _prefix_reference(q, kc, vc, positions, magnitude=True)
        _assert_within(y, ref, 1e-5 + weights, BF16_ULP, "bf16 prefix attention")
    for b in range(B):
        one = ops.prefix_attention(q[b : b + 1], kc[b : b + 1], vc[b : b + 1], positions[b : b + 1])
        assert torch.equal(one, y[b : b + 1])


def test_prefix_attention_rejects_what_it_cannot_take() -> None:
    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8)
    pos = torch.tensor([[3, 4, 5]])
    with pytest.raises(RuntimeError, match="position 6 is outside the 6 keys given"):
        ops.prefix_attention(q, kv, kv, pos + 1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 q, k and v alike"):
        ops.prefix_attention(q.bfloat16(), kv, kv, pos)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.prefix_attention(torch.randn(1, 2, 3, 6), torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6), pos)
    with pytest.raises(RuntimeError, match="3 query heads do not share 2 key/value heads evenly"):
        ops.prefix_attention(torch.randn(1, 3, 3, 8), kv, kv, pos)
    with pytest.raises(RuntimeError, match=r"positions must be \(B, T\) int64"):
        ops.prefix_attention(q, kv, kv, pos[0])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 64), (2, 5, 13)])
def test_rms_norm_matches_reference_in_the_weights_dtype(x_dtype, w_dtype, shape) -> None:
    g = _gen(6)
    x = (3 * torch.randn(*shape, generator=g)).to(x_dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype)
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    y = ops.rms_norm(x, w, 1e-5)
    assert y.dtype == w_dtype and y.shape == x.shape
    _assert_within(y, ref, 1e-6, 1e-5 if w_dtype == torch.float32 else BF16_ULP, "rms_norm")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 768), (3, 1, 64), (2, 5, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_reference_in_the_weights_dtype(x_dtype, w_dtype, shape, bias) -> None:
    """GPT-2's LayerNorm (biased variance) against float64, rows of every length (13: an 8-lane part and a tail),
    residual-stream-sized values with an offset (the mean matters), output in the weights' dtype."""
    g = _gen(8)
    x = (3 * torch.randn(*shape, generator=g) + 5).to(x_dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype) if bias else None
    ref = F.layer_norm(x.double(), shape[-1:], w.double(), None if b is None else b.double(), 1e-5)
    y = ops.layer_norm(x, w, b, 1e-5)
    assert y.dtype == w_dtype and y.shape == x.shape
    _assert_within(y, ref, 1e-5, 1e-5 if w_dtype == torch.float32 else BF16_ULP, "layer_norm")
    with pytest.raises(RuntimeError, match="features"):
        ops.layer_norm(x[..., :-1], w, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 64), (2, 3, 26), (1, 2)])
def test_silu_mul_matches_reference(dtype, shape) -> None:
    g = _gen(7)
    gate_up = (4 * torch.randn(*shape, generator=g)).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    ref = F.silu(gate) * up
    y = ops.silu_mul(gate_up)
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2)
    # bf16: silu is rounded before the product, as F.silu(gate) * up rounds it
    _assert_within(y, ref, 1e-6, 1e-5 if dtype == torch.float32 else 2 * BF16_ULP, "silu_mul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_vector_body_and_scalar_tail_round_alike(dtype) -> None:
    """F = 15: features 0-7 take the 8-wide body, 8-14 the scalar tail; the same gate/up values in both give the same
    bits (the body rounds silu and the product into bf16 as the scalar code does, ties to even, NaN kept a NaN)."""
    g = _gen(8)
    vals = 4 * torch.randn(2, 7, generator=g)
    vals[0, 0], vals[1, 3] = float("nan"), 1e30
    gate = torch.cat([vals, torch.zeros(2, 1), vals], dim=1)
    up = torch.cat([vals.flip(-1), torch.ones(2, 1), vals.flip(-1)], dim=1)
    y = ops.silu_mul(torch.cat([gate, up], dim=1).to(dtype))
    assert torch.equal(y[:, :7].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       y[:, 8:].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_silu_mul_saturates_cleanly_for_large_inputs() -> None:
    gate_up = torch.tensor([[-100.0, -30.0, 0.0, 30.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    y = ops.silu_mul(gate_up)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, F.silu(gate_up[:, :5]) * gate_up[:, 5:], rtol=1e-6, atol=1e-6)


def _gelu_tanh64(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(u)) in float64 as x sigmoid(2u), the same number (1 + tanh(u) = 2 sigmoid(2u)) without the
    cancellation that makes 1 + tanh(u) exactly 0 in float64 below x ~ -6."""
    x = x.double()
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    return x * torch.sigmoid(2 * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3072), (3, 1, 64), (2, 13), (1,)])
def test_gelu_tanh_matches_the_float64_formula(dtype, shape) -> None:
    """GPT-2's GELU (tanh form) against float64, tails of every length, values far into both saturations (x / (1 +
    exp(-2u)) keeps the negative side's tiny outputs accurate where 1 + tanh(u) cancels), in x's dtype."""
    g = _gen(9)
    x = (4 * torch.randn(*shape, generator=g)).to(dtype)
    x.view(-1)[:1] = -12.0
    y = ops.gelu_tanh(x)
    assert y.dtype == dtype and y.shape == x.shape
    # float32 rounds exp's argument -2u to ~1 ulp: a relative error of ~|2u| 2^-24 in the result (the formula's own
    # conditioning; 20-50 ulps at x ~ -8), then a few ulps; bf16 one rounding more
    ref, two_u = _gelu_tanh64(x), (2 * math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)).abs()
    rounding = 4e-7 if dtype == torch.float32 else BF16_ULP
    _assert_within(y, ref, 1e-30 + (2.4e-7 * two_u + rounding) * ref.abs(), 0.0, "gelu_tanh")
    far = torch.tensor([-100.0, -30.0, -9.0, -3.0, 0.0, 3.0, 30.0, 1e30], dtype=dtype)
    _assert_within(ops.gelu_tanh(far), _gelu_tanh64(far), 1e-30, BF16_ULP, "saturation")
    special = ops.gelu_tanh(torch.tensor([float("inf"), float("nan")], dtype=dtype))
    assert special[0] == float("inf") and special[1].isnan()
    with pytest.raises(RuntimeError, match="gelu_tanh takes float32 or bfloat16"):
        ops.gelu_tanh(torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gelu_tanh_vector_body_and_scalar_tail_agree_and_the_module_runs_the_op(dtype) -> None:
    """Elements 0-7 take the 8-wide body, 8-14 the scalar tail: the same values give the same bits; at inference
    engine.model.gelu_tanh is the op (what decode steps run), in training torch's GELU with its gradient."""
    from engine.model import gelu_tanh

    g = _gen(10)
    vals = 3 * torch.randn(2, 7, generator=g)
    x = torch.cat([vals, torch.zeros(2, 1), vals], dim=1).to(dtype)
    y = ops.gelu_tanh(x)
    assert torch.equal(y[:, :7], y[:, 8:])
    with torch.no_grad():
        assert torch.equal(gelu_tanh(x), y)
    t = x.float().requires_grad_()
    out = gelu_tanh(t)
    torch.testing.assert_close(out, F.gelu(t, approximate="tanh"), rtol=0, atol=0)
    out.sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_clear_errors_for_bad_inputs() -> None:
    x = torch.randn(2, 13)
    with pytest.raises(RuntimeError, match="x has 13 features but the weight takes 14"):
        ops.linear(x, torch.randn(7, 14), None)
    with pytest.raises(RuntimeError, match="weight must be float32 or bfloat16"):
        ops.linear(x, torch.zeros(7, 13, dtype=torch.int16), None)
    with pytest.raises(RuntimeError, match="q must be int8"):
        ops.linear_i8(x, torch.zeros(7, 13, dtype=torch.int16), torch.ones(7), None)
    with pytest.raises(RuntimeError, match="gate_up must hold gate and up halves"):
        ops.silu_mul(torch.randn(2, 7))
    H, hd, S = 2, 8, 4
    kc, vc = torch.zeros(2, H, S, hd), torch.zeros(2, H, S, hd)
    qkv = torch.randn(2, 3 * H * hd)
    with pytest.raises(RuntimeError, match="position 4 is outside the cache's 4 slots"):
        ops.decode_attention(qkv, kc, vc, torch.tensor([0, 4]), None, None, H)
    with pytest.raises(RuntimeError, match="position -1 is outside"):
        ops.decode_attention(qkv, kc, vc, torch.tensor([-1, 0]), None, None, H)
    cos = torch.ones(2, hd)
    with pytest.raises(RuntimeError, match="past the RoPE tables"):
        ops.decode_attention(qkv, kc, vc, torch.tensor([0, 3]), cos, cos, H)
    with pytest.raises(RuntimeError, match="qkv width does not match the heads"):
        ops.decode_attention(torch.randn(2, 3 * H * hd + 1), kc, vc, torch.tensor([0, 1]), None, None, H)
    assert not kc.any() and not vc.any(), "a rejected call must not touch the caches"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_pieces_reads_every_byte_of_each_piece_once(threads) -> None:
    """The bench's stream ceiling: each piece's floats summed once whatever the thread split (pieces smaller than
    a thread's share, and uneven ones), nothing past the pieces read; clear errors for what it cannot take."""
    sizes = [128, 384, 4096, 131072 + 128, 256]
    total = sum(sizes)
    buf = torch.zeros(total + 1024, dtype=torch.uint8)
    assert buf.data_ptr() % 32 == 0
    values = buf.view(torch.float32)
    values[: total // 4] = torch.arange(total // 4, dtype=torch.float32) % 7  # small integers: exact float32 sums
    values[total // 4 :] = 1e30  # past the pieces: would show in the sum
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert ops.read_pieces(buf, sizes) == float(values[: total // 4].double().sum())
        assert ops.read_pieces(buf, []) == 0.0
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="multiples of 128 bytes"):
        ops.read_pieces(buf, [100])
    with pytest.raises(RuntimeError, match="the pieces need"):
        ops.read_pieces(buf, [total + 2048])
    with pytest.raises(RuntimeError, match="contiguous uint8"):
        ops.read_pieces(values, [128])


def test_available_is_false_with_kernels_off_and_true_again_after(monkeypatch) -> None:
    kernels.available.cache_clear()
    try:
        monkeypatch.setenv("SCRATCHCHAT_KERNELS", "off")
        assert kernels.available() is False
        monkeypatch.undo()
    finally:
        kernels.available.cache_clear()  # a later call sees the restored environment, not the cached False
    assert kernels.available() is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 16, 17, 40, 49152])
def test_argmax_is_torch_argmax_with_ties_infinities_and_nans(dtype, V) -> None:
    """The greedy pick: the first of equal maxima, -inf rows, and a NaN anywhere (vector part or tail) winning as
    torch.argmax lets it; several rows and a non-contiguous view."""
    g = _gen(11)
    x = torch.randn(9, V, generator=g).to(dtype)
    x[1] = float("-inf")
    x[2, :] = 0.0
    x[2, V // 2 :] = 3.0  # equal maxima: the first one
    x[3, -1] = 50.0  # the maximum in the tail past the vectors
    x[4, 0] = float("nan")
    x[5, V // 3] = float("nan")
    x[5, 0] = 100.0
    x[6, -1] = float("nan")
    x[7, : V - 1] = float("-inf")
    x[8] = torch.arange(V, dtype=torch.float32).flip(0).to(dtype)  # the maximum first
    torch.testing.assert_close(ops.argmax(x), torch.argmax(x, dim=-1, keepdim=True), rtol=0, atol=0)
    wide = torch.randn(V, 3, generator=g).to(dtype).t()  # a strided view
    torch.testing.assert_close(ops.argmax(wide), torch.argmax(wide, dim=-1, keepdim=True), rtol=0, atol=0)


def test_argmax_errors() -> None:
    with pytest.raises(RuntimeError, match="V > 0"):
        ops.argmax(torch.zeros(2, 0))
    with pytest.raises(RuntimeError, match=r"\(R, V\)"):
        ops.argmax(torch.zeros(5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.argmax(torch.zeros(2, 3, dtype=torch.float64))
