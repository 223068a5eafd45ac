"""One process of the multi-process test (tests/test_multiprocess.py).

Run as ``python tests/multiprocess_child.py PROCESS_ID NUM_PROCESSES PORT``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``: it joins a
``jax.distributed`` job on localhost (gloo CPU collectives), shards a model
over a mesh of every process's devices and checks that jaxprune's masks,
training steps and compaction equal the single-device results computed in
the same process. Prints ``REPORT{json}``.
"""

from __future__ import annotations

import json
import re
import sys

import jax

PID, NPROC, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{PORT}", num_processes=NPROC, process_id=PID)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxprune as jp  # noqa: E402

MESH = Mesh(np.array(jax.devices()), ("x",))
LOCAL = jax.local_devices()[0]
rng = np.random.default_rng(0)
HOST = {
    "l0": {"w": rng.standard_normal((64, 256)).astype(np.float32),
           "b": rng.standard_normal(256).astype(np.float32)},
    "l1": {"w": np.round(rng.standard_normal((256, 128)) * 2).astype(np.float32) / 2,  # ties
           "b": rng.standard_normal(128).astype(np.float32)},
    "l2": {"w": rng.standard_normal((128, 8)).astype(np.float32)},
}
SPECS = {"l0": {"w": P(None, "x"), "b": P("x")}, "l1": {"w": P("x", None), "b": P("x")},
         "l2": {"w": P("x", None)}}
X = rng.standard_normal((16, 64)).astype(np.float32)
Y = rng.integers(0, 8, 16)


def shard(tree, specs):
    def one(a, spec):
        sh = NamedSharding(MESH, spec)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])
    return jax.tree.map(one, tree, specs, is_leaf=lambda x: isinstance(x, np.ndarray))


def local(tree):
    return jax.device_put(tree, LOCAL)


def model(p, x):
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"]


def loss(p):
    logits = model(p, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def same(global_tree, ref_tree) -> tuple[bool, int]:
    """Every addressable shard of the global arrays equals the reference."""
    ok, n = True, 0
    for g, r in zip(jax.tree.leaves(global_tree), jax.tree.leaves(ref_tree)):
        r = np.asarray(r)
        for s in g.addressable_shards:
            n += 1
            ok &= bool(np.array_equal(np.asarray(s.data), r[s.index] if r.ndim else r))
    return ok, n


def run_steps(tx, params, steps):
    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = jax.jit(tx.init)(params)  # one compile, not one per eager op on sharded arrays
    for _ in range(steps):
        params, state = step(params, state)
    return params, jp.get_masks(state)


def reference(compute, like):
    """The single-device result, computed by process 0 only and broadcast to
    the others (each reference compiles once, not once per process);
    ``like`` gives the other processes its shapes and dtypes."""
    out = compute() if PID == 0 else jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
    out = multihost_utils.broadcast_one_to_all(out)  # a sum over processes: bools come back ints
    return jax.tree.map(lambda r, a: np.asarray(r).astype(a.dtype), out, like)


def collectives(fn, *args) -> list:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    out = []
    for m in re.finditer(r"=\s*(\S+)\s+(all-gather|all-to-all|collective-permute|all-reduce)"
                         r"(?:-start)?\(", hlo):
        dims = re.findall(r"\[([0-9,]*)\]", m.group(1))
        out.append((m.group(2), max([int(np.prod([int(d) for d in x.split(",") if d] or [1]))
                                     for x in dims] or [0])))
    return out


def main() -> None:
    report = {"pid": PID, "cases": {}}
    sharded, ref = shard(HOST, SPECS), local(HOST)

    def masks_fn(p):
        return jp.masks.global_topk(jp.scores.magnitude(p), 0.8)

    report["cases"]["global_topk"] = same(jax.jit(masks_fn)(sharded), jax.jit(masks_fn)(ref))
    topk = lambda p: jp.masks.topk(jp.scores.magnitude(p), 0.6)  # noqa: E731
    report["cases"]["topk"] = same(jax.jit(topk)(sharded), jax.jit(topk)(ref))
    report["collectives"] = collectives(masks_fn, sharded)
    report["leaf_size"] = 64 * 256
    runs = {
        "prune_step": lambda: jp.prune(optax.adam(1e-2), sparsity=0.7, update_every=1),
        "lottery_round": lambda: jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=2,
                                                   prune_rate=0.5),
        "rigl_exchange": lambda: jp.rigl(optax.sgd(0.1), sparsity=0.75, update_every=1,
                                         allocation="uniform"),
    }
    for name, make in runs.items():
        p_sh, m_sh = run_steps(make(), sharded, 3)
        p_ref, m_ref = reference(lambda: run_steps(make(), ref, 3), (p_sh, m_sh))
        ok_m, n = same(m_sh, m_ref)
        ok_p = bool(all(np.allclose(np.asarray(s.data), np.asarray(r)[s.index], atol=1e-6)
                        for g, r in zip(jax.tree.leaves(p_sh), jax.tree.leaves(p_ref))
                        for s in g.addressable_shards))
        report["cases"][name] = (ok_m and ok_p, n)
    g = jp.graph.trace(model, HOST, X)
    smasks = jax.jit(lambda p: jp.structured.masks(g, jp.structured.scores(g, p), 0.5))
    m_sh, m_ref = smasks(sharded), smasks(ref)
    report["cases"]["structured_masks"] = same(m_sh, m_ref)
    small_sh = jp.structured.compact(g, sharded, m_sh)  # sharded in, decisions reduced
    small_ref = jp.structured.compact(g, ref, m_ref)
    small_sh = multihost_utils.process_allgather(small_sh, tiled=True)
    report["cases"]["compaction"] = (bool(all(np.array_equal(np.asarray(a), np.asarray(b))
                                              for a, b in zip(jax.tree.leaves(small_sh),
                                                              jax.tree.leaves(small_ref)))), 1)
    print("REPORT" + json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
