"""numba's cache of our kernels goes stale when any kernel file changes, not only the function's own
(the stack kernel compiles the layer kernel of another file into itself)."""
import os

from moe_offload import _jit_cache


def test_every_kernel_is_cached_under_the_stamp_of_all_kernel_files():
    from moe_offload import _decode_jit, _grouped_jit, _int4pack_jit, _layer_jit

    names = {name for name, _, _ in _jit_cache.stamp()}
    assert names == {"_decode_jit.py", "_grouped_jit.py", "_int4pack_jit.py", "_layer_jit.py"}
    for fn in (_decode_jit.stack, _layer_jit.layer, _grouped_jit.prep, _int4pack_jit.dequant_bf16):
        locator = fn._cache._impl._locator
        assert getattr(type(locator), "moe_offload_stamped", False)
        assert locator.get_source_stamp() == _jit_cache.stamp()  # what the cache index is checked against


def test_the_stamp_moves_with_any_kernel_file(tmp_path, monkeypatch):
    monkeypatch.setattr(_jit_cache, "_DIR", str(tmp_path))
    for name in ("_a_jit.py", "_b_jit.py", "other.py"):
        (tmp_path / name).write_text("x = 1\n")
    before = _jit_cache.stamp()
    assert [n for n, _, _ in before] == ["_a_jit.py", "_b_jit.py"]
    (tmp_path / "other.py").write_text("x = 22\n")
    assert _jit_cache.stamp() == before
    os.utime(tmp_path / "_b_jit.py", (1, 1))
    assert _jit_cache.stamp() != before


def test_functions_outside_the_package_keep_numbas_own_locators(tmp_path):
    from numba.core import caching

    _jit_cache.install()
    _jit_cache.install()  # once is enough: no second set of stamped locators
    classes = caching.CacheImpl._locator_classes
    assert sum(getattr(c, "moe_offload_stamped", False) for c in classes) == 3
    f = tmp_path / "user_code.py"
    f.write_text("def g():\n    return 1\n")
    ns = {}
    exec(compile(f.read_text(), str(f), "exec"), ns)
    impl = caching.CompileResultCacheImpl(ns["g"])
    assert not getattr(type(impl._locator), "moe_offload_stamped", False)
