"""Many processes, the way users scale out: two ``jax.distributed``
processes on localhost (gloo CPU collectives), 4 host devices each, one mesh
over all 8 devices. Sharded ``global_topk``/``topk`` masks, a ``jp.prune``
train step, a ``jp.lottery_ticket`` round, a RigL exchange, structured masks
and compaction equal the single-device results, and mask selection moves no
parameter-sized array between processes (only counts and samples)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multidevice

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = str(_free_port())
    child = os.path.join(HERE, "multiprocess_child.py")
    procs = [subprocess.Popen([sys.executable, child, str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=540)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"process failed:\n{out[-4000:]}"
    return [json.loads([ln for ln in o.splitlines() if ln.startswith("REPORT")][-1][6:])
            for o in outs]


def test_every_process_gets_the_single_device_results(reports):
    for r in reports:
        bad = {k: v for k, v in r["cases"].items() if not v[0]}
        assert not bad, f"process {r['pid']}: differs from single device: {bad}"
        assert all(n > 0 for _, n in r["cases"].values())  # shards were compared
    assert sorted(r["pid"] for r in reports) == [0, 1]


def test_selection_moves_no_parameter_sized_array(reports):
    for r in reports:
        colls = r["collectives"]
        assert colls, "no collectives parsed: the HLO pattern no longer matches"
        big = [c for c in colls if c[1] >= r["leaf_size"]]
        assert not big, f"parameter-sized collectives: {big}"
