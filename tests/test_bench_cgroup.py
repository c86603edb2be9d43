"""`bench --memory-limit`: every mode in a memory cgroup. Tested for real where this machine lets the
tests make a child memory cgroup (root, cgroup v1 or a delegated v2), skipped with the reason otherwise."""
import subprocess
import sys

import pytest

from llama_bench_fake import write_fake_llama_bench
from moe_offload import bench
from moe_offload.bench import cgroup as cgroup_module
from moe_offload.bench.cgroup import KILLED_OOM, CgroupError, MemoryCgroup, check_available
from moe_offload.bench.llamacpp import LLAMACPP
from moe_offload.bench.run import _check_cgroup, _run_one
from moe_offload.errors import MoeOffloadError

LIMIT = 96 * 2**20  # a Python interpreter needs ~10 MiB


@pytest.fixture(scope="module")
def cgroups():
    try:
        return check_available(LIMIT)
    except CgroupError as e:
        pytest.skip(f"no memory cgroup on this machine: {e}")


def _allocate(cg: MemoryCgroup, mib: int) -> subprocess.CompletedProcess:
    code = f"b = bytearray({mib} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint(open('/proc/self/cgroup').read())"
    return subprocess.run(cg.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60)


def test_a_process_within_the_limit_runs_in_the_cgroup(cgroups):
    with MemoryCgroup.create(LIMIT, "test") as cg:
        proc = _allocate(cg, 16)
        assert proc.returncode == 0, proc.stderr
        assert cg.path.name in proc.stdout  # it ran inside the child cgroup, from its start
        assert not cg.killed_by_oom(proc.returncode) and cg.oom_kills() == 0
        assert 16 * 2**20 < cg.peak_bytes() <= LIMIT
    assert not cg.path.exists()  # removed afterwards


def test_a_process_beyond_the_limit_is_killed(cgroups):
    with MemoryCgroup.create(LIMIT, "test") as cg:
        proc = _allocate(cg, 3 * LIMIT // 2**20)
        assert proc.returncode != 0 and cg.killed_by_oom(proc.returncode)
    assert not cg.path.exists()


def test_a_mode_killed_for_memory_is_a_result_not_an_error(cgroups, tmp_path):
    binary, _ = write_fake_llama_bench(tmp_path, alloc_mb=3 * LIMIT // 2**20)
    spec = dict(binary=str(binary), gguf=str(tmp_path / "m.gguf"), threads=1, n_prompt=8, n_gen=4, repetitions=1)
    with MemoryCgroup.create(LIMIT, LLAMACPP) as cg:
        r = _run_one(LLAMACPP, {}, spec, None, False, cg)
    assert r["failed"] == KILLED_OOM and r["decode_tokens_per_s"] is None and r["cgroup_oom_kills"] >= 1
    binary, _ = write_fake_llama_bench(tmp_path / "small", alloc_mb=8)  # the same within the limit: measured
    with MemoryCgroup.create(LIMIT, LLAMACPP) as cg:
        r = _run_one(LLAMACPP, {}, dict(spec, binary=str(binary)), None, False, cg)
    assert "failed" not in r and r["decode_tokens_per_s"] > 0 and 0 < r["cgroup_peak_bytes"] <= LIMIT


def test_bench_under_a_memory_limit_reports_the_killed_mode_and_runs_the_others(cgroups, tmp_path, capsys):
    """offload cannot even import torch in 96 MiB; llama.cpp (the fake) still runs after it."""
    _, store = bench.prepare_shape("tiny", tmp_path / "models")
    binary, _ = write_fake_llama_bench(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    out = bench.run_bench(store, None, ["offload", LLAMACPP], prompts=1, max_new_tokens=2, cgroup_limit=LIMIT,
                          llamacpp=dict(binary=str(binary), gguf=str(tmp_path / "m.gguf")))
    assert out["modes"]["offload"]["failed"] == KILLED_OOM
    assert out["modes"][LLAMACPP]["decode_tokens_per_s"] > 0
    assert out["modes"]["offload"]["llamacpp_decode_ratio"] is None
    settings = out["settings"]["memory_cgroup"]
    assert settings["limit_bytes"] == LIMIT and settings["cgroup_version"] in (1, 2)
    assert out["settings"]["llamacpp"]["n_gen"] == 2 and out["settings"]["llamacpp"]["n_prompt"] == bench.LONG_PREFILL
    table = bench.format_table(out)
    assert KILLED_OOM in next(line for line in table.splitlines() if line.startswith("| decode tok/s"))


def test_no_cgroup_gives_a_clear_error_not_a_run_without_limit(monkeypatch):
    monkeypatch.setattr(cgroup_module, "_mounts", lambda: [])
    with pytest.raises(MoeOffloadError, match="--memory-limit: cannot run the modes in a memory cgroup: no cgroup"):
        _check_cgroup(LIMIT, in_process=False)
    monkeypatch.setattr(cgroup_module, "_mounts", lambda: [("/", "/sys/fs/cgroup", "cgroup2", [])])
    monkeypatch.setattr(cgroup_module, "_own_cgroups", lambda: {"cpu": "/"})
    with pytest.raises(MoeOffloadError, match="no memory controller"):
        _check_cgroup(LIMIT, in_process=False)
    with pytest.raises(MoeOffloadError, match="cannot be combined with --in-process"):
        _check_cgroup(LIMIT, in_process=True)
    assert _check_cgroup(None, in_process=False) is None


def test_a_cgroup_that_cannot_be_made_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cgroup_module, "find_parent", lambda: (1, tmp_path / "gone"))  # mkdir of a child fails
    with pytest.raises(CgroupError, match="cannot create a child memory cgroup in .*gone"):
        MemoryCgroup.create(LIMIT)


def test_a_mode_killed_in_the_long_prefill_keeps_its_prompts_numbers(monkeypatch):
    """The worker reports its numbers after the prompts; killed in the long prefill, they still show."""
    from moe_offload.bench import run as run_module

    partial = {"decode_tokens_per_s": 5.5, "prefill_tokens_per_s": 30.0, "long_prefill_tokens_per_s": 0.0,
               "tokens": [[1, 2]], "decode_tokens": 2}

    def killed(spec, progress, wrap=None):
        raise run_module.ModeFailed("mode offload failed (exit code -9)", -9, partial)

    class KillingCgroup:
        limit_bytes = LIMIT
        wrap = staticmethod(lambda cmd: cmd)
        killed_by_oom = staticmethod(lambda returncode: returncode == -9)
        peak_bytes = staticmethod(lambda: LIMIT)
        oom_kills = staticmethod(lambda: 1)

    monkeypatch.setattr(run_module, "run_mode_subprocess", killed)
    r = _run_one("offload", {"mode": "offload"}, None, None, False, KillingCgroup())
    assert r["incomplete"] == KILLED_OOM and r["decode_tokens_per_s"] == 5.5 and r["long_prefill_tokens_per_s"] is None
    assert "failed" not in r and r["cgroup_oom_kills"] == 1
    lines = bench.format_table({"modes": {"offload": r}}).splitlines()
    assert "5.50" in next(line for line in lines if line.startswith("| decode tok/s"))
    assert KILLED_OOM in next(line for line in lines if "(128 tokens)" in line)
    partial_gone = dict(partial)
    monkeypatch.setattr(run_module, "run_mode_subprocess",
                        lambda spec, progress, wrap=None: (_ for _ in ()).throw(run_module.ModeFailed("x", -9, None)))
    assert _run_one("offload", {"mode": "offload"}, None, None, False, KillingCgroup())["failed"] == KILLED_OOM
    assert partial_gone == partial
