"""The compiled CPU sampling kernel: the PyTorch path's numbers and gradients, threads, fallbacks, cache."""

import os
import subprocess
import warnings

import pytest
import torch

from medclust.errors import MedclustError
from medclust.models import native
from medclust.models.native import build
from medclust.models.native.slice_sampling import sample_slices_native
from medclust.models.slice_attention import DeformableSliceAttention
from medclust.models.slice_geometry import build_slice_index, interpolation_weights

D, H = 32, 4


def _pair(points: int = 3, default_init: bool = False, max_offset_mm: float = 30.0):
    torch.manual_seed(0)
    ours = DeformableSliceAttention(D, H, points, max_offset_mm=max_offset_mm, init_span_mm=8.0, impl="native")
    if not default_init:
        with torch.no_grad():
            ours.offset_proj.weight.normal_(std=3.0)
            ours.weight_proj.weight.normal_(std=1.0)
    ref = DeformableSliceAttention(D, H, points, max_offset_mm=max_offset_mm, impl="bag")
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _volumes(case: str, b: int = 3, s: int = 37):
    g = torch.Generator().manual_seed(5)
    if case == "uniform":
        z = torch.arange(s, dtype=torch.float32).repeat(b, 1) * 2.5
    elif case == "gaps":  # far from even: the kernel's walk gives up and binary-searches
        z = torch.cat([torch.arange(s - 3, dtype=torch.float32), torch.tensor([200.0, 201.0, 900.0])]).repeat(b, 1)
    else:
        z = torch.cumsum(torch.rand(b, s, generator=g) * 3 + 0.2, 1)
    z = z[:, torch.randperm(s, generator=g)]
    valid = torch.ones(b, s, dtype=torch.bool)
    if case == "padded":
        valid[1, 20:] = False
        valid[2, ::3] = False
    elif case == "one_slice":
        valid[:] = False
        valid[:, 5] = True
    elif case == "empty_row":
        valid[0] = False
    return z, valid


def _grads(m, query, value, index, via_forward: bool):
    out = m(query, index) if via_forward else m.attend(query, value, index)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    inputs = [query] + ([] if via_forward else [value]) + [p for p in m.parameters()]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("case", ["uniform", "irregular", "gaps", "padded", "one_slice", "empty_row"])
@pytest.mark.parametrize("via_forward", [False, True])
def test_kernel_gives_the_pytorch_paths_outputs_and_gradients(case, via_forward):
    ours, ref = _pair()
    z, valid = _volumes(case)
    index = build_slice_index(z, valid)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(*z.shape, D, generator=g, requires_grad=True)
    value = torch.randn(*z.shape, D, generator=g, requires_grad=True)
    assert ours.uses_native(query)
    out, grads = _grads(ours, query, value, index, via_forward)
    out_ref, grads_ref = _grads(ref, query, value, index, via_forward)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("z", [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.7, 1.0, 2.9, 3.1, 5.0]])
def test_kernel_follows_the_pytorch_rules_at_ties(z):
    # default init with 3 points: the middle point sits exactly on the query's own slice. At
    # the first and last slices that is z_min / z_max, where torch.maximum / torch.minimum pass
    # half the gradient (offsets past the ends pass none); inside, the slice counts as the lower
    # neighbour (searchsorted's right=True), which decides the interval the gradient comes from.
    # The uneven z makes the kernel's first guess land a slice short, so its walk decides it
    ours, _ = _pair(points=3, default_init=True, max_offset_mm=4.0)
    z = torch.tensor([z])
    index = build_slice_index(z, torch.ones(1, 6, dtype=torch.bool))
    positions, attn = ours.sampling_positions(torch.zeros(1, 6, D), index)
    positions = positions.detach().requires_grad_()
    table = torch.randn(6 * H, D // H, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad(sample_slices_native(table, positions, attn, index, H).sum(), positions)
    pos_ref = positions.detach().clone().requires_grad_()
    lo, hi, w = interpolation_weights(index, pos_ref.reshape(1, -1))
    t = table.view(1, 6, H, D // H)
    head = torch.arange(H)[None, None, :, None].expand(1, 6, H, 3).reshape(1, -1)
    v_lo, v_hi = t[0, lo[0], head[0]], t[0, hi[0], head[0]]
    sampled = (1 - w[0, :, None]) * v_lo + w[0, :, None] * v_hi
    (want,) = torch.autograd.grad((attn.reshape(-1, 1) * sampled).sum(), pos_ref)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    first_slice_middle_point = got[0, 0, :, 1]
    assert (first_slice_middle_point != 0).any(), "a tie at z_min passes half the gradient, not none"


def test_threads_give_the_single_thread_result():
    ours, _ = _pair()
    z, valid = _volumes("padded", s=600)
    index = build_slice_index(z, valid)
    query = torch.randn(*z.shape, D, generator=torch.Generator().manual_seed(4), requires_grad=True)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3):  # 3 * 600 * 4 queries: 3 copies of the table gradient
            torch.set_num_threads(threads)
            results.append(_grads(ours, query, query, index, via_forward=True))
    finally:
        torch.set_num_threads(before)
    (out1, g1), (out3, g3) = results
    torch.testing.assert_close(out3, out1, atol=1e-6, rtol=1e-6)
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nan_position_gives_nan_not_a_quiet_read():
    z = torch.arange(8, dtype=torch.float32)[None]
    index = build_slice_index(z, torch.ones(1, 8, dtype=torch.bool))
    positions = torch.zeros(1, 8, 1, 2)
    positions[0, 3, 0, 1] = float("nan")
    out = sample_slices_native(torch.randn(8, 5), positions, torch.full((1, 8, 1, 2), 0.5), index, 1)
    assert torch.isnan(out[3]).all()
    assert torch.isfinite(out[torch.arange(8) != 3]).all()


def test_shapes_that_would_read_past_the_buffers_are_refused():
    index = build_slice_index(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool))
    good = torch.zeros(2, 5, 3, 4)
    assert sample_slices_native(torch.zeros(30, 8), good, good, index, 3).shape == (30, 8)
    with pytest.raises(MedclustError, match=r"value table \(29, 8\) must have B\*S\*H = 30 rows"):
        sample_slices_native(torch.zeros(29, 8), good, good, index, 3)
    with pytest.raises(MedclustError, match=r"must both be \(B, S, H, P\) = \(2, 5, 3, P\)"):
        sample_slices_native(torch.zeros(30, 8), torch.zeros(2, 5, 2, 4), torch.zeros(2, 5, 2, 4), index, 3)
    with pytest.raises(MedclustError, match="must both be"):
        sample_slices_native(torch.zeros(30, 8), good, torch.zeros(2, 5, 3, 2), index, 3)


def test_auto_falls_back_to_pytorch_where_the_kernel_cannot_run(monkeypatch):
    m = DeformableSliceAttention(D, H, 2)
    assert m.impl == "auto"
    assert m.uses_native(torch.zeros(1, 4, D))
    assert not m.uses_native(torch.zeros(1, 4, D, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m.uses_native(torch.zeros(1, 4, D))
    with pytest.raises(MedclustError, match="impl='native' takes CPU float32"):
        DeformableSliceAttention(D, H, 2, impl="native").double().uses_native(torch.zeros(1, 4, D, dtype=torch.float64))
    with pytest.raises(MedclustError, match="CPU float32"):
        sample_slices_native(torch.zeros(8, 4, dtype=torch.float64), torch.zeros(1, 2, 4, 1), torch.ones(1, 2, 4, 1),
                             build_slice_index(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)), 4)
    import medclust.models.slice_attention as sa

    monkeypatch.setattr(sa, "native_sampling_available", lambda: False)
    assert not m.uses_native(torch.zeros(1, 4, D))
    with pytest.raises(MedclustError, match="could not be built"):
        DeformableSliceAttention(D, H, 2, impl="native").uses_native(torch.zeros(1, 4, D))
    # and the fallback computes: same numbers as impl="bag"
    ref = DeformableSliceAttention(D, H, 2, impl="bag")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, D)
    index = build_slice_index(torch.arange(9.0).repeat(2, 1), torch.ones(2, 9, dtype=torch.bool))
    torch.testing.assert_close(m(x, index), ref(x, index))


def test_build_is_cached_atomic_and_fails_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLUST_CACHE_DIR", str(tmp_path / "cache"))
    lib = build.load_library.__wrapped__("slice_sampling")
    assert lib is not None
    (built,) = (tmp_path / "cache" / "native").iterdir()
    assert built.name.startswith("slice_sampling-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert build.load_library.__wrapped__("slice_sampling") is not None
    assert built.stat().st_mtime_ns == stamp, "a cached build is reused, not rebuilt"

    # a source that does not compile: one warning naming it, nothing left in the cache
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.c").write_text("int f( {\n")
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    with pytest.warns(RuntimeWarning, match=r"could not build broken\.c"):
        assert build.load_library.__wrapped__("broken") is None
    assert [p.name for p in (tmp_path / "cache" / "native").iterdir()] == [built.name]

    monkeypatch.setattr(build, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found; broken uses its slower PyTorch path"):
        assert build.load_library.__wrapped__("broken") is None
    monkeypatch.setenv("MEDCLUST_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.load_library.__wrapped__("slice_sampling") is None
    assert not build.native_enabled()


def test_a_compiler_without_openmp_builds_a_serial_kernel_with_the_same_numbers(tmp_path, monkeypatch):
    # Apple's clang has no -fopenmp: the build retries without it (the source's OpenMP parts are
    # #ifdef'd), silently, and the caller's per-thread gradient copies stay zero but one
    cc = tmp_path / "cc-without-openmp"
    cc.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1; }; done\n'
        'exec gcc "$@"\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("MEDCLUST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_compiler", lambda: str(cc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = build.load_library.__wrapped__("slice_sampling")
    assert lib is not None
    (built,) = (tmp_path / "cache" / "native").glob("*.so")
    assert "omp_get_thread_num" not in subprocess.run(["nm", "-D", str(built)], capture_output=True, text=True).stdout
    from medclust.models.native import slice_sampling

    monkeypatch.setattr(slice_sampling, "_library", lambda: slice_sampling._declare(lib))
    ours, ref = _pair()
    z, valid = _volumes("padded", s=600)
    index = build_slice_index(z, valid)
    query = torch.randn(*z.shape, D, generator=torch.Generator().manual_seed(4), requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out, grads = _grads(ours, query, query, index, via_forward=True)
        out_ref, grads_ref = _grads(ref, query, query, index, via_forward=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDCLUST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "medclust" / "native"
    monkeypatch.setenv("MEDCLUST_CACHE_DIR", str(tmp_path / "x"))
    assert native.cache_dir() == tmp_path / "x" / "native"
    assert os.fspath(native.cache_dir()).endswith(os.path.join("x", "native"))
