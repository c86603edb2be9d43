"""Memory: `--expert-cache auto` sizing on injected numbers and fake /proc and cgroup trees, the
stored-width embedding, and the memory split in the statistics."""
import argparse
import os

import pytest
import torch

import moe_offload
from moe_offload import memory
from moe_offload.errors import MoeOffloadError
from moe_offload.model import StoredEmbedding
from moe_offload.options import add_budget_args, load_kwargs

MiB = 2**20
BLOB = 6 * MiB


def slots(available, still_needed=0, *, experts=8, top_k=2, pools=32, layers=32):
    return memory.auto_cache_slots(available, still_needed, BLOB, experts=experts, top_k=top_k, pools=pools,
                                   layers=layers)


def test_auto_fills_what_is_left_after_the_rest_and_the_margin():
    available, rest = 1500 * MiB, 300 * MiB
    per_layer, sentence = slots(available, rest)
    budget = available - rest - int(available * memory.SAFETY_FRACTION)
    assert per_layer == budget // BLOB // 32 == 5
    assert per_layer * 32 * BLOB <= budget < (per_layer + 1) * 32 * BLOB
    assert f"{per_layer * 32} slots" in sentence and "of 8 experts per layer" in sentence


def test_auto_with_plenty_of_memory_holds_every_expert():
    per_layer, sentence = slots(64 * 2**30, 500 * MiB)
    assert per_layer == 8
    assert "every expert" in sentence
    per_pool, _ = slots(64 * 2**30, 500 * MiB, pools=1)  # one global pool: every expert of every layer
    assert per_pool == 8 * 32


def test_auto_at_exactly_top_k_and_just_below():
    rest = 100 * MiB
    for available in range(500 * MiB, 520 * MiB, MiB):
        budget = available - rest - int(available * memory.SAFETY_FRACTION)
        if budget // BLOB // 32 == 2:
            assert slots(available, rest)[0] == 2
        elif budget // BLOB // 32 < 2:
            with pytest.raises(MoeOffloadError):
                slots(available, rest)


def test_auto_below_top_k_is_a_clear_error():
    with pytest.raises(MoeOffloadError) as e:
        slots(400 * MiB, 200 * MiB)
    message = str(e.value)
    assert "--experts-per-layer 2" in message and "available" in message and "smallest cache" in message
    with pytest.raises(MoeOffloadError):
        slots(0, 0)


def test_room_in_a_cgroup_does_not_count_droppable_page_cache():
    assert memory.room_in(1000, 600) == 400
    assert memory.room_in(1000, 600, reclaimable=200) == 600
    assert memory.room_in(1000, 1200) == 0


def _proc(tmp_path, cgroup_lines, mem_available_kib=8 * 2**20):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "meminfo").write_text(f"MemTotal: 24000000 kB\nMemFree: 1000 kB\nMemAvailable: {mem_available_kib} kB\n")
    return proc


def test_cgroup_v1_limit_minus_usage(tmp_path):
    proc = _proc(tmp_path, ["4:memory:/jobs/one", "3:cpu,cpuacct:/", "0::/"])
    group = tmp_path / "cg" / "memory" / "jobs" / "one"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(2**30))
    (group / "memory.usage_in_bytes").write_text(str(400 * MiB))
    (group / "memory.stat").write_text(f"cache 0\nhierarchical_memory_limit {2**30}\ntotal_inactive_file {100 * MiB}\n")
    got = memory.available_memory(proc, tmp_path / "cg")
    assert got.bytes == 2**30 - 300 * MiB
    assert "v1" in got.source


def test_cgroup_v1_ancestor_limit_and_no_limit(tmp_path):
    proc = _proc(tmp_path, ["4:memory:/jobs/one"], mem_available_kib=3 * 2**20)
    group = tmp_path / "cg" / "memory" / "jobs" / "one"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text("9223372036854771712")
    (group / "memory.usage_in_bytes").write_text(str(100 * MiB))
    (group / "memory.stat").write_text(f"hierarchical_memory_limit {1500 * MiB}\n")
    assert memory.available_memory(proc, tmp_path / "cg").bytes == 1400 * MiB  # the parent's limit
    (group / "memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    got = memory.available_memory(proc, tmp_path / "cg")  # no limit anywhere: MemAvailable
    assert got.bytes == 3 * 2**30 and "MemAvailable" in got.source


def test_cgroup_v2_tightest_of_the_group_and_its_parents(tmp_path):
    proc = _proc(tmp_path, ["0::/a/b"])
    root = tmp_path / "cg"
    b = root / "a" / "b"
    b.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (b / "memory.max").write_text("max\n")
    (b / "memory.current").write_text(str(200 * MiB))
    (root / "a" / "memory.max").write_text(str(1000 * MiB))
    (root / "a" / "memory.current").write_text(str(300 * MiB))
    (root / "a" / "memory.stat").write_text(f"anon 1\ninactive_file {50 * MiB}\n")
    got = memory.available_memory(proc, root)
    assert got.bytes == 750 * MiB and "v2" in got.source


def test_a_limit_above_the_machines_memory_gives_mem_available(tmp_path):
    proc = _proc(tmp_path, ["0::/a"], mem_available_kib=512 * 1024)
    root = tmp_path / "cg"
    (root / "a").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "a" / "memory.max").write_text(str(64 * 2**30))
    (root / "a" / "memory.current").write_text("0")
    assert memory.available_memory(proc, root).bytes == 512 * MiB


def test_cli_defaults_to_auto_and_a_given_budget_replaces_it():
    p = argparse.ArgumentParser()
    add_budget_args(p)
    assert load_kwargs(p.parse_args([]))["expert_cache"] == "auto"
    kw = load_kwargs(p.parse_args(["--experts-per-layer", "3"]))
    assert kw["expert_cache"] is None and kw["experts_per_layer"] == 3
    assert load_kwargs(p.parse_args(["--expert-cache", "1GiB"]))["expert_cache"] == "1GiB"
    bench = argparse.ArgumentParser()
    add_budget_args(bench, auto=False)
    assert load_kwargs(bench.parse_args([]))["expert_cache"] is None


def test_load_auto_sizes_and_says_so(tiny_store4, monkeypatch):
    st = moe_offload.load(tiny_store4, experts_per_layer=2, prefetch=0)
    blob, layers, experts = st.offload_runtime.store.blob_size, len(st.offload_spec.layers), st.offload_runtime.store.num_experts
    st.close()
    # Room for the reserve, the margin and 3 experts per layer.
    available = int((memory.RUNTIME_RESERVE + 3 * layers * blob + 1000) / (1 - memory.SAFETY_FRACTION)) + 1
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: memory.Available(available, "injected"))
    model = moe_offload.load(tiny_store4, expert_cache="auto")
    try:
        stats = model.offload_stats().as_dict()
        assert stats["cache_slots"] == 3 * layers
        assert "expert cache auto" in stats["expert_cache_choice"] and "injected" in stats["expert_cache_choice"]
        assert "expert cache auto" in model.offload_stats().summary()
    finally:
        model.close()
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: memory.Available(10**12, "injected"))
    model = moe_offload.load(tiny_store4, expert_cache="auto")
    assert model.offload_stats().cache_slots == experts * layers
    model.close()
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: memory.Available(memory.RUNTIME_RESERVE, "x"))
    with pytest.raises(MoeOffloadError, match="smallest cache"):
        moe_offload.load(tiny_store4, expert_cache="auto")


def test_no_budget_in_the_api_keeps_a_quarter_of_the_experts(tiny_store4):
    model = moe_offload.load(tiny_store4)
    try:
        assert not model.offload_stats().cache_choice
        spec = model.offload_spec
        assert model.offload_stats().cache_slots == max(2, -(-spec.num_experts // 4)) * len(spec.layers)
    finally:
        model.close()


def test_embedding_stays_at_stored_width_mapped_and_the_split_adds_up(tiny_store4):
    model = moe_offload.load(tiny_store4, experts_per_layer=2)
    try:
        embed = model.get_input_embeddings()
        assert isinstance(embed, StoredEmbedding) and embed.mapped
        from safetensors import safe_open

        with safe_open(tiny_store4 / "dense.safetensors", "pt") as f:  # the stored width, whatever it is
            assert embed.weight.dtype == f.get_tensor("model.embed_tokens.weight").dtype
        assert model.dtype == torch.float32  # transformers reads it from the first parameter
        ids = torch.tensor([[1, 5, 7]])
        assert torch.equal(embed(ids), embed.weight.float()[ids])
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
        split = model.offload_stats().as_dict()["memory"]
        assert split["baseline_bytes"] > 0 and split["dense_bytes"] > 0
        assert split["dense_mapped_bytes"] == embed.weight.numel() * embed.weight.element_size()
        assert split["cache_bytes"] == model.offload_runtime.cache.buffer.numel()
        assert split["peak_rss_bytes"] >= split["baseline_bytes"] + split["dense_bytes"] - 2 * MiB
        assert "memory: peak RSS" in model.offload_stats().summary()
    finally:
        model.close()


def test_numba_is_reserved_for_until_it_is_loaded(monkeypatch):
    import sys

    import numba  # noqa: F401  (loaded: nothing more to reserve)

    assert memory.numba_still_to_load({"rowtile", "dense"}) == 0
    monkeypatch.delitem(sys.modules, "numba")
    assert memory.numba_still_to_load({"rowtile"}) == memory.numba_still_to_load({"grouped"}) == memory.NUMBA_RESERVE
    assert memory.numba_still_to_load({"int4pack", "int8", "dense"}) == 0


def test_auto_on_a_gpu_sizes_from_free_vram(tiny_store4, monkeypatch):
    """--device cuda with auto (the CLI's default): the free VRAM, less the dense part that moves there,
    the runtime reserve and the largest matrix's dequantization temporaries. The sizing is plain
    arithmetic, checked here with the device's free memory injected (tests/test_cuda.py runs it on a GPU)."""
    from moe_offload.config import OffloadConfig
    from moe_offload.model import _all_formats, auto_slots_per_pool
    from moe_offload.store import Store

    st = Store.open(tiny_store4)
    host = []
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: host.append(1) or memory.Available(10**12, "host"))
    kept = (memory.RUNTIME_RESERVE + st.manifest["dense_file_size"]
            + memory.DEVICE_DEQUANTIZE_BYTES_PER_WEIGHT * max(m["n"] * m["k"] for m in _all_formats(st)))
    free = int((kept + 3 * st.num_layers * st.blob_size + 1000) / (1 - memory.SAFETY_FRACTION)) + 1
    asked = []
    monkeypatch.setattr(memory, "available_device_memory",
                        lambda device: asked.append(device) or memory.Available(free, "free on the injected GPU"))
    per_pool, said = auto_slots_per_pool(st, OffloadConfig(device="cuda:1", expert_cache="auto"), loaded=True)
    assert (per_pool, asked, host) == (3, ["cuda:1"], [])
    assert "free on the injected GPU" in said
    monkeypatch.setattr(memory, "available_device_memory", lambda device: memory.Available(kept, "tiny GPU"))
    with pytest.raises(MoeOffloadError, match="smallest cache"):
        auto_slots_per_pool(st, OffloadConfig(device="cuda", expert_cache="auto"))


def _smaps_values(field: str, mapping) -> list[str]:
    """`field` of every mapping of this process for which mapping(lo, hi, path) holds (/proc/self/smaps)."""
    values, inside = [], False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = mapping(lo, hi, fields[5] if len(fields) >= 6 else "")
        elif inside and fields[0] == field + ":":
            values.append(fields[1])
    return values


def _mapping_rss_kib(path) -> int:
    return sum(int(v) for v in _smaps_values("Rss", lambda lo, hi, name: name == str(path)))


def test_page_out_gives_back_a_file_mappings_resident_pages(tmp_path):
    """What the warm-up does to LLVM's library once the kernels are loaded, on a file of our own."""
    import mmap

    path = tmp_path / "library-like.bin"
    with open(path, "wb") as f:  # written back, so its pages are clean like a library's
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # touch every page
        before = _mapping_rss_kib(path)
        assert before >= 8 * 1024 - 64
        assert memory.page_out_mappings("library-like.bin") == 8 << 20
        assert _mapping_rss_kib(path) < before / 4
        assert memory.page_out_mappings("no-such-mapping") == 0
        assert m[:16] == path.read_bytes()[:16]  # still readable: a page needed again is read back
    finally:
        m.close()


def test_commands_other_than_serve_do_not_import_the_web_stack():
    """fastapi, starlette and pydantic cost ~7 MiB in every process that imports them."""
    import subprocess
    import sys

    code = ("import sys; from moe_offload.cli import build_parser; build_parser(); "
            "print([m for m in ('fastapi', 'starlette', 'pydantic', 'uvicorn') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cache_slots_are_advised_for_huge_pages(tiny_store4):
    """The slots the kernels stream from sit in memory the kernel may back with 2 MiB pages."""
    from pathlib import Path

    from moe_offload.loader import HUGE_PAGE, aligned_buffer

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    big = aligned_buffer(4 * HUGE_PAGE)

    def eligible(t) -> str:
        return (_smaps_values("THPeligible", lambda lo, hi, name: lo <= t.data_ptr() < hi) or ["?"])[0]

    assert eligible(big) == "1"
    model = moe_offload.load(tiny_store4, experts_per_layer=4)
    try:
        buffer = model.offload_runtime.cache.buffer
        assert buffer.numel() < HUGE_PAGE or eligible(buffer) == "1"
    finally:
        model.close()


def test_resident_bytes_counts_the_touched_pages_of_a_buffer():
    """How the statistics tell the expert cache's touched slots from the rest of the process."""
    import mmap

    from moe_offload.loader import aligned_buffer

    buf = aligned_buffer(64 * mmap.PAGESIZE)
    assert memory.resident_bytes(buf) == 0
    buf[:5 * mmap.PAGESIZE + 1].fill_(1)  # six pages touched
    assert memory.resident_bytes(buf) in range(6 * mmap.PAGESIZE, 64 * mmap.PAGESIZE + 1)
    assert memory.resident_bytes(buf[:0]) == 0


def test_resident_bytes_says_none_where_the_system_cannot_tell():
    from moe_offload.loader import aligned_buffer

    buf = aligned_buffer(1 << 20)
    assert memory.resident_bytes(buf[1:]) is None  # not on a page boundary: mincore refuses


def _resident_pages(path, start: int, length: int) -> int:
    """Pages of [start, start + length) of the file that are in the page cache (mincore)."""
    import ctypes
    import mmap

    with open(path, "rb") as f:
        mem = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        first = start - start % mmap.PAGESIZE
        n = -(-(start + length - first) // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        buf = ctypes.c_char.from_buffer(mem)
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf) + first), ctypes.c_size_t(n * mmap.PAGESIZE), vec)
        del buf
        assert ok == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)
    finally:
        mem.close()


def test_a_lookup_reads_its_page_not_the_pages_around_it_and_preload_reads_the_table(tmp_path):
    """The mapped table is advised random: a row looked up on a cold page cache brings in its own
    page, not the kernel's read-around (32 pages of 4 KiB with the usual 128 KiB); read_ahead (what
    preload asks for) brings in the whole table."""
    import time

    from safetensors.torch import save_file

    from moe_offload.model import _map_tensor

    table = torch.randn(4096, 256).to(torch.bfloat16)  # 2 MiB
    path = tmp_path / "dense.safetensors"
    save_file({"embed.weight": table}, str(path))
    weight, mapping = _map_tensor(path, "embed.weight")
    fd = os.open(path, os.O_RDONLY)
    try:  # after reading the header, whose read-ahead brought in the table's first pages
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident_pages(path, mapping.start, mapping.length) > 2:
        pytest.skip("this file system keeps the file in the page cache (e.g. tmpfs): nothing to read")
    embed = StoredEmbedding(weight, torch.float32, None, mapping)
    assert torch.equal(embed(torch.tensor([[2000]])), table[2000].float().view(1, 1, -1))
    assert 1 <= _resident_pages(path, mapping.start, mapping.length) <= 2  # the row's page (a row may straddle two)
    embed.read_ahead()
    pages = -(-mapping.length // 4096)
    for _ in range(100):
        if _resident_pages(path, mapping.start, mapping.length) >= pages:
            break
        time.sleep(0.05)
    assert _resident_pages(path, mapping.start, mapping.length) >= pages


def test_preload_reads_the_mapped_table_ahead(tiny_store4, monkeypatch):
    asked = []
    monkeypatch.setattr(StoredEmbedding, "read_ahead", lambda self: asked.append(self))
    from moe_offload.store import Store

    model = moe_offload.load(tiny_store4, experts_per_layer=Store.open(tiny_store4).num_experts)
    try:
        assert model.offload_runtime.preload()
        assert asked == [model.get_input_embeddings()]
    finally:
        model.close()
