"""Sharded selection: masks from jax.jit(global_topk / topk) over parameters
sharded on 8 host CPU devices (1-D mesh of 8, 2-D mesh of 2 x 4) equal the
single-device masks bit for bit, stay sharded, and the compiled HLO moves no
parameter-sized data between devices (no all-gather, all-to-all,
collective-permute, all-reduce or reduce-scatter whose result has as many
elements as a sharded leaf), and that scan did parse collectives.

The 8 devices need XLA_FLAGS set before jax is imported, so the work runs in
a child process; its JSON report is checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.multidevice

CHILD = textwrap.dedent(
    r'''
    import json, os, re, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    # Four 256x512 kernels plus biases. Kernel 2 has heavy ties (values
    # rounded to 0.5) so tie-breaking by position crosses shard boundaries.
    host = {}
    for i in range(4):
        k = rng.standard_normal((256, 512)).astype(np.float32)
        if i == 2:
            k = np.round(k * 2) / 2
        host[f"layer{i}"] = {"kernel": k, "bias": rng.standard_normal(512).astype(np.float32)}
    host["layer3"]["kernel"] = host["layer3"]["kernel"].astype(jnp.bfloat16)
    leaf_size = 256 * 512

    devs = np.array(jax.devices())
    meshes = {
        "1d": (Mesh(devs, ("x",)), [P("x", None), P(None, "x"), P("x", None), P(None, "x")], P("x")),
        "2d": (Mesh(devs.reshape(2, 4), ("a", "b")), [P("a", "b"), P("b", "a"), P("a", "b"), P(("a", "b"), None)], P("b")),
    }

    def fns():
        return {
            "global_topk": lambda p, s: jp.masks.global_topk(jp.scores.magnitude(p), s),
            "topk": lambda p, s: jp.masks.topk(jp.scores.magnitude(p), s),
        }

    single = jax.devices()[0]
    unsharded = jax.device_put(host, single)
    SPARSITIES = {"global_topk": (0.0, 0.5, 0.9, 0.97), "topk": (0.0, 0.5, 0.9, 0.97)}
    refs = {}
    for name, f in fns().items():
        for s in SPARSITIES[name]:
            refs[name, s] = jax.tree.map(np.asarray, jax.jit(f)(unsharded, jnp.float32(s)))

    report = {"cases": [], "collectives": [], "leaf_size": leaf_size}
    coll_re = re.compile(
        r"=\s*(.*?)\s+(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(?:-start)?\(")
    shape_re = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")
    for mesh_name, (mesh, kspecs, bspec) in meshes.items():
        sh = {}
        for i in range(4):
            lay = host[f"layer{i}"]
            sh[f"layer{i}"] = {
                "kernel": jax.device_put(lay["kernel"], NamedSharding(mesh, kspecs[i])),
                "bias": jax.device_put(lay["bias"], NamedSharding(mesh, bspec)),
            }
        for name, f in fns().items():
            jf = jax.jit(f)
            hlo = jf.lower(sh, jnp.float32(0.5)).compile().as_text()
            for line in hlo.splitlines():
                mm = coll_re.search(line)
                if not mm:
                    continue
                sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                         for dims in shape_re.findall(mm.group(1))]
                report["collectives"].append({
                    "mesh": mesh_name, "fn": name, "op": mm.group(2),
                    "max_elems": max(sizes or [0]), "line": line.strip()[:400]})
            for s in SPARSITIES[name]:
                out = jf(sh, jnp.float32(s))
                ref = refs[name, s]
                for i in range(4):
                    m = out[f"layer{i}"]["kernel"]
                    r = ref[f"layer{i}"]["kernel"]
                    a = np.asarray(m)
                    report["cases"].append({
                        "mesh": mesh_name, "fn": name, "s": s, "leaf": f"layer{i}/kernel",
                        "equal": bool(np.array_equal(a, r)), "kept": int(a.sum()), "ref_kept": int(r.sum()),
                        "n_diff": int((a != r).sum()),
                        "sharding": str(m.sharding.spec) if hasattr(m.sharding, "spec") else str(m.sharding),
                        "param_sharding": str(kspecs[i]),
                        "same_sharding": bool(m.sharding.is_equivalent_to(
                            sh[f"layer{i}"]["kernel"].sharding, 2)),
                    })
                    b = out[f"layer{i}"]["bias"]
                    assert b.shape == () and bool(b), "unselected bias must get scalar True"
    print("REPORT" + json.dumps(report))
    '''
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def test_sharded_masks_equal_single_device_masks(report):
    cases = report["cases"]
    assert len(cases) == 2 * (4 + 4) * 4, len(cases)
    bad = [c for c in cases if not c["equal"]]
    assert not bad, "sharded masks differ from single-device masks:\n" + "\n".join(map(str, bad[:10]))
    # The test is not vacuous: the sparsities prune something, and the
    # global masks spread unevenly over the leaves.
    assert any(0 < c["kept"] < 256 * 512 for c in cases)


def test_masks_keep_the_parameter_sharding(report):
    bad = [c for c in report["cases"] if not c["same_sharding"]]
    assert not bad, "masks not sharded like their parameters:\n" + "\n".join(
        f"{c['mesh']} {c['fn']} {c['leaf']}: param {c['param_sharding']}, mask {c['sharding']}" for c in bad[:10])


def test_no_parameter_sized_collectives(report):
    leaf = report["leaf_size"]
    colls = report["collectives"]
    big = [c for c in colls if c["max_elems"] >= leaf]
    summary = "\n".join(f"{c['mesh']} {c['fn']} {c['op']} {c['max_elems']} elems: {c['line'][:200]}"
                        for c in colls)
    print(f"collectives seen (parameter leaf = {leaf} elements):\n{summary or 'none'}")
    assert not big, (
        f"parameter-sized collectives (>= {leaf} elements) in the compiled HLO:\n"
        + "\n".join(f"{c['mesh']} {c['fn']} {c['op']}: {c['line']}" for c in big)
    )
    # What remains is sample-sized (the strided sample of select.py): at most
    # one shard's worth.
    assert all(c["max_elems"] <= leaf // 8 for c in colls), summary


def test_collectives_were_parsed(report):
    """The HLO scan above is not vacuous: the per-shard counts of every
    sharded selection cross devices, so each (mesh, function) has at least one
    all-reduce, and the regex must have found it."""
    seen = {(c["mesh"], c["fn"], c["op"]) for c in report["collectives"]}
    assert report["collectives"], "no collective parsed: has the HLO text format changed?"
    for mesh in ("1d", "2d"):
        for fn in ("global_topk", "topk"):
            assert (mesh, fn, "all-reduce") in seen, (mesh, fn, sorted(seen))
