r"""Page faults and time per call of two training computations with each host-memory setting
of clmim/host_memory.py — glibc's defaults ("system"), glibc told to keep freed memory ("keep")
and tcmalloc preloaded ("tcmalloc"; left out, and said so, where no tcmalloc library is found) —
each setting in a fresh interpreter, alternating --rounds times.

Measured in each interpreter: the demo ViT's forward + backward (mu/4, 32 px, batch 64) and the
demo MoCo v3 trainer update (configs/pretrain_moco_v3.py:demo_stage1, jitted as the trainer
does; its compile seconds too): per call over --calls calls after two warm-up calls, the wall
seconds, minor page faults and kernel CPU seconds (`resource.getrusage`), and the scratch
buffer XLA gives each call (`memory_analysis().temp_size_in_bytes`).

  python benchmarks/host_memory.py [--rounds 2] [--calls 10]

Prints one JSON object: per setting, the list of rounds.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _per_call(fn, calls):
  fn()
  fn()
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(calls):
    fn()
  seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return {"seconds": round(seconds / calls, 4),
          "page_faults": round((after.ru_minflt - before.ru_minflt) / calls),
          "kernel_seconds": round((after.ru_stime - before.ru_stime) / calls, 4)}


def measure(calls):
  """The measurements of one interpreter (the setting comes from CLMIM_HOST_MEMORY)."""
  sys.path.insert(0, ROOT)
  from clmim import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.keep_freed_memory()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from clmim.train import objectives, trainer  # pylint: disable=import-outside-toplevel
  from configs import pretrain_moco_v3  # pylint: disable=import-outside-toplevel

  config = pretrain_moco_v3.get_config("demo_stage1")
  objective = objectives.load(config)
  images = jax.random.uniform(jax.random.PRNGKey(0), (64, 32, 32, 3))
  encoder = objective.encoder
  params = encoder.init(jax.random.PRNGKey(1), images)
  gradient = jax.jit(jax.grad(lambda p, x: jnp.sum(encoder.apply(p, x)[:, 0] ** 2))).lower(
      params, images).compile()  # compiled once: timed, and asked for its scratch buffer
  vit = _per_call(lambda: jax.block_until_ready(gradient(params, images)), calls)
  vit["scratch_mb"] = round(gradient.memory_analysis().temp_size_in_bytes / 2**20, 1)

  train_state, tx, schedule = trainer.initial_state(config, objective)
  update = jax.jit(trainer.make_update(objective, tx, schedule))
  first_bad, rng = jnp.asarray(-1, jnp.int32), jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = update.lower(train_state, first_bad, images, rng).compile()
  compile_seconds = time.perf_counter() - start
  moco = _per_call(lambda: jax.block_until_ready(compiled(train_state, first_bad, images, rng)),
                   calls)
  moco["compile_seconds"] = round(compile_seconds, 2)
  moco["scratch_mb"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
  return {"host_memory": host_memory.status(), "demo_vit_gradient": vit, "moco_v3_update": moco}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(measure(args.calls)))
    return None
  started = time.time()
  sys.path.insert(0, ROOT)
  from clmim import host_memory  # pylint: disable=import-outside-toplevel
  tcmalloc = host_memory.find_tcmalloc()
  # Each worker starts with its setting's allocator only: none inherits this process's preload.
  base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  environments = {"system": {**base, "CLMIM_HOST_MEMORY": "system"},
                  "keep": {**base, "CLMIM_HOST_MEMORY": "keep"}}
  if tcmalloc:
    environments["tcmalloc"] = {**base, "CLMIM_HOST_MEMORY": "tcmalloc", "LD_PRELOAD": tcmalloc}
  results = {setting: [] for setting in environments}
  for _ in range(args.rounds):
    for setting, env in environments.items():
      done = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--worker", f"--calls={args.calls}"],
          env=env, capture_output=True, text=True, check=True)
      results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
  report = {"benchmark": "host_memory", "calls": args.calls, "rounds": args.rounds,
            "results": results, "tcmalloc": tcmalloc or "not found (setting left out)",
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "libc": "-".join(platform.libc_ver()), "total_seconds": round(time.time() - started, 1)}
  print(json.dumps(report))
  return report


if __name__ == "__main__":
  main()
