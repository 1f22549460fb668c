"""Model memory on 2 MB pages (`runtime.pages`): which memory is touched, and that the kernel really
backs it with huge pages where it can."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
from lmcor.runtime import pages

HUGE = pages.HUGE
linux = pytest.mark.skipif(sys.platform != "linux", reason="huge pages through madvise are Linux only")


def test_added_takes_new_regions_whole_and_what_old_ones_grew_by():
    before = {0x1000: 0x5000, 0x10000: 0x20000, 0x30000: 0x40000, 0x70000: 0x80000}
    after = {0x1000: 0x9000, 0x10000: 0x20000, 0x30000: 0x38000, 0x50000: 0x60000, 0x68000: 0x80000}
    assert pages.added(before, after) == [(0x5000, 0x9000), (0x50000, 0x60000), (0x68000, 0x70000)]
    # a new mapping merged between two old ones: only the gap it filled
    assert pages.added({0x1000: 0x2000, 0x3000: 0x4000}, {0x1000: 0x4000}) == [(0x2000, 0x3000)]


def test_whole_pages_are_the_aligned_2mb_pages_inside_the_range():
    assert list(pages.whole_pages(1, 3 * HUGE)) == [HUGE, 2 * HUGE]
    assert list(pages.whole_pages(HUGE, 2 * HUGE)) == [HUGE]
    assert list(pages.whole_pages(HUGE + 1, 3 * HUGE - 1)) == []


@linux
def test_a_mapped_file_with_any_name_is_read_past(tmp_path, monkeypatch):
    monkeypatch.delenv("LMCOR_HUGE_PAGES", raising=False)
    path = tmp_path / "jos\u00e9 \udcff.bin"  # not ASCII, not UTF-8
    path.write_bytes(b"\0" * mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
        before = pages.mark()
        assert before is not None
        pages.back_added(before, "test")


def test_a_failure_to_read_the_maps_loads_the_model_anyway(monkeypatch, tmp_path):
    monkeypatch.delenv("LMCOR_HUGE_PAGES", raising=False)
    monkeypatch.setattr(pages, "_MAPS", str(tmp_path / "missing"))
    assert pages.mark() is None
    monkeypatch.setattr(pages, "anonymous_regions", lambda: 1 / 0)
    pages.back_added({}, "test")  # logged, not raised


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("LMCOR_HUGE_PAGES", "0")
    assert pages.mark() is None
    pages.back_added(None, "nothing")  # a no-op, not an error


def _anonymous(size: int, tag: int) -> tuple[mmap.mmap, int]:
    """Private anonymous memory (as malloc's) and its address. `tag` (an madvise flag with no bearing
    on huge pages) keeps the kernel from merging the mapping with its neighbours, so that smaps
    reports it alone: give each mapping of a test its own."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(tag)
    return memory, ctypes.addressof(ctypes.c_char.from_buffer(memory))


def _huge_total_kb() -> int:
    with open("/proc/self/smaps_rollup", "rb") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith(b"AnonHugePages:"))


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address`."""
    inside = False
    with open("/proc/self/smaps", "rb") as smaps:
        for line in smaps:
            fields = line.split()
            if b"-" in fields[0] and not fields[0].endswith(b":"):
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                inside = start <= address < end
            elif inside and fields[0] == b"AnonHugePages:":
                return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def collapsing():
    """Skips where this kernel has no MADV_COLLAPSE (before Linux 6.1): nothing to check there."""
    memory, address = _anonymous(4 * HUGE, mmap.MADV_DONTFORK)
    memory.write(b"\1" * len(memory))
    page = pages.whole_pages(address, address + len(memory))[0]
    if pages._libc().madvise(page, HUGE, pages.MADV_COLLAPSE) != 0:
        pytest.skip(f"this kernel does not collapse pages (errno {ctypes.get_errno()})")
    yield


@linux
def test_memory_added_and_in_use_goes_on_huge_pages_and_the_rest_stays(collapsing, monkeypatch):
    monkeypatch.delenv("LMCOR_HUGE_PAGES", raising=False)
    older, older_address = _anonymous(4 * HUGE, mmap.MADV_MERGEABLE)
    older.write(b"\1" * len(older))
    before = pages.mark()
    used, used_address = _anonymous(6 * HUGE, mmap.MADV_DONTFORK)
    used.write(b"\2" * len(used))
    sparse, sparse_address = _anonymous(6 * HUGE, mmap.MADV_DONTDUMP)
    for offset in range(0, len(sparse), 2 * mmap.PAGESIZE):  # every other 4 KB page touched
        sparse[offset] = 3
    pages.back_added(before, "test")
    assert _huge_kb(used_address) >= 4 * HUGE // 1024  # at least its whole aligned pages
    assert _huge_kb(sparse_address) == 0  # collapsing would have filled it
    assert _huge_kb(older_address) == 0  # not added since the mark
    assert used[: 4] == b"\2" * 4 and used[-1] == 2 and sparse[0] == 3 and sparse[1] == 0  # contents kept


_SESSION_ON_PAGES = """
import json, os, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper
from lmcor.runtime.sessions import open_session
sys.path.insert(0, sys.argv[2])
from test_pages import _huge_total_kb

weight = np.random.default_rng(0).standard_normal((512, 20480)).astype(np.float32)  # 40 MB
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 512])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 20480])],
                          [numpy_helper.from_array(weight, "w")])
from pathlib import Path
path = Path(sys.argv[1]) / "matmul.onnx"
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
x = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
results = {}
for setting in ("0", "1"):
    os.environ["LMCOR_HUGE_PAGES"] = setting
    before = _huge_total_kb()
    session = open_session(path, threads=1)
    results[setting] = (session.run(None, {"x": x})[0].tolist(), _huge_total_kb() - before)
print(json.dumps(results))
"""


@linux
def test_a_session_opens_on_huge_pages_and_runs_the_same(collapsing, tmp_path):
    """In a process of its own: ONNX Runtime's copies of the weights are new memory there (a long
    test process may hand them room its heap already holds, which is not memory added)."""
    import json
    import subprocess
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _SESSION_ON_PAGES, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as setting:
        if "[always]" not in setting.read():  # where it is, the kernel uses huge pages anyway
            assert results["0"][1] == 0
    assert results["1"][1] >= 16 * HUGE // 1024  # of the 40 MB weight (and ONNX Runtime's packed copy)
    assert results["0"][0] == results["1"][0]
