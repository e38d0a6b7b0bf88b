"""Default llama.cpp thread counts (engine/threads.py)."""

from __future__ import annotations

from engine.threads import default_threads, physical_cores


def test_small_machines_leave_one_core_to_python_while_decoding():
    assert default_threads(1) == (1, 1)
    assert default_threads(2) == (1, 2)
    assert default_threads(4) == (3, 4)
    # Above 4 cores, every core decodes (not measured on such machines).
    assert default_threads(8) == (8, 8)
    assert default_threads(0) == (1, 1)


def _sysfs(tmp_path, siblings: dict[int, str]):
    for cpu, sib in siblings.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(sib + "\n")
    return tmp_path


def test_smt_siblings_count_as_one_core(tmp_path):
    sysfs = _sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert physical_cores([0, 1, 2, 3], sysfs) == 2
    assert physical_cores([0, 2], sysfs) == 1  # the affinity mask may hold one core's two threads
    assert physical_cores([0, 1], sysfs) == 2


def test_unreadable_topology_counts_logical_cpus(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path / "missing") == 3
    assert physical_cores() >= 1
