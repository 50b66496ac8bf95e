"""The Ray backend against the local backend on this machine (run alone on an idle machine).

1. The demo's RL iteration (preset=demo: its SFT and preference-model checkpoints, made once here with the
   local backend; then one RL iteration per run) with backend=local and with backend=ray (one node, one
   training worker, one inference engine: $RLHFKIT_INFERENCE_ENGINE, else vLLM's CPU build when a vLLM Python
   is found (RLHFKIT_VLLM_PYTHON / .venv-vllm), else the torch engine; sampling, judging and compute_logprobs
   (the KL penalty's reference logprobs) all run on it), alternating local, ray, local, ray, ...
   Each run is its own process; the time is the iteration's own `time/total` minus its evaluation
   (`time/eval`), so process and Ray start-up are not in it. Medians are reported.
2. The Ray layer's overhead on a trivial request, in ms: a no-op actor call, and `compute_logprobs` of a
   two-token prompt through the Ray sampling client against the local sampling client (the difference is
   what Ray adds: submission, the object store, the result's return).

`--tiny` uses preset=smoke (a tiny random model) for a quick check of the script itself. Results go to
benchmarks/results/bench_ray.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, load_snapshot, machine_info

from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.ray_backend.sampling import default_inference_engine
from rlhfkit.utils.atomic import read_jsonl, write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "rlhfkit", "pipeline"]


def run(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(PIPELINE + args, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")


PHASES = ("sample", "judge", "train", "sync_weights")  # the RL iteration's own time/* metrics


def rl_iteration_seconds(preset: str, stages: Path, backend: str, env: dict[str, str]) -> dict[str, float]:
    """One RL iteration from the prepared SFT and preference-model checkpoints, in a fresh log folder: its time
    without the evaluation (`total`) and the time of each phase."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-ray-{backend}-"))
    for stage in ("sft", "rm"):
        (root / stage).symlink_to(stages / stage)
    run(
        [
            f"preset={preset}",
            f"log_root={root}",
            "run_sft=false",
            "run_rm=false",
            "rl_max_steps=1",
            "report=false",
            f"backend={backend}",
            "num_train_workers=1",
            "num_samplers=1",
        ],
        env,
    )
    record = read_jsonl(root / "rl" / "metrics.jsonl")[0]
    return {
        "total": record["time/total"] - record.get("time/eval", 0.0),
        **{phase: record.get(f"time/{phase}", float("nan")) for phase in PHASES},
    }


def ray_overheads_ms(base_model: str, reps: int) -> dict[str, float]:
    import ray

    from rlhfkit.engine import ModelInput, ServiceClient

    local = ServiceClient().create_sampling_client(base_model=base_model)
    remote = ServiceClient(backend="ray", num_samplers=1, inference_engine="torch").create_sampling_client(
        base_model=base_model
    )

    @ray.remote(num_cpus=0)
    class Noop:
        def ping(self) -> None:
            return None

    noop = Noop.remote()
    prompt = ModelInput.from_ints([1, 2])

    def median_ms(call) -> float:
        call()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    noop_ms = median_ms(lambda: ray.get(noop.ping.remote()))
    local_ms = median_ms(lambda: local.compute_logprobs(prompt).result())
    remote_ms = median_ms(lambda: remote.compute_logprobs(prompt).result())
    ray.shutdown()
    return {
        "noop_actor_call_ms": noop_ms,
        "compute_logprobs_local_ms": local_ms,
        "compute_logprobs_ray_ms": remote_ms,
        "ray_overhead_ms": remote_ms - local_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="preset=smoke (a tiny random model): checks the script")
    parser.add_argument("--reps", type=int, default=3, help="RL iterations per backend (alternating)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--stages",
        type=Path,
        default=None,
        help="a run folder whose finished sft/ and rm/ stages to use (e.g. runs/demo); default: "
        "made here with the local backend",
    )
    args = parser.parse_args()
    preset = "smoke" if args.tiny else "demo"
    # the smoke preset's tiny model has a head size vLLM's CPU build cannot run: torch engines there
    engine = (
        "torch"
        if args.tiny
        else os.environ.get("RLHFKIT_INFERENCE_ENGINE") or default_inference_engine(EngineSettings.from_env())
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(REPO),
        "RLHFKIT_INFERENCE_ENGINE": engine,
    }
    before = load_snapshot()
    if args.stages is not None:
        stages = args.stages.resolve()
        print(f"[bench_ray] SFT and preference model of {stages}")
    else:
        stages = Path(tempfile.mkdtemp(prefix="bench-ray-stages-"))
        print(f"[bench_ray] SFT and preference model ({preset}, local) in {stages}")
        run([f"preset={preset}", f"log_root={stages}", "run_rl=false", "report=false"], env)
    times: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    for k in range(args.reps):
        for backend in ("local", "ray"):
            seconds = rl_iteration_seconds(preset, stages, backend, env)
            times[backend].append(seconds)
            print(f"[bench_ray] rep {k + 1}/{args.reps} {backend}: {seconds['total']:.2f} s per RL iteration")
    base_model = json.loads((stages / "pipeline_config.json").read_text())["base_model"]
    if base_model == "tiny":  # the smoke preset's random model, built in the log folder
        base_model = str(stages / "tiny_model")
    overheads = ray_overheads_ms(base_model, reps=20 if args.tiny else 200)
    medians = {b: {key: statistics.median(r[key] for r in t) for key in t[0]} for b, t in times.items()}
    results = {
        "machine": machine_info(args.threads),
        "load_before": before,
        "load_after": load_snapshot(),
        "preset": preset,
        "inference_engine": env["RLHFKIT_INFERENCE_ENGINE"],
        "rl_iteration_seconds": times,
        "median_seconds": medians,
        **overheads,
    }
    table = "\n".join(
        [
            f"| RL iteration ({preset}), median of {args.reps} | backend=local | backend=ray ({env['RLHFKIT_INFERENCE_ENGINE']} engine) |",
            "|---|---|---|",
            f"| seconds, without its evaluation | {medians['local']['total']:.2f} | {medians['ray']['total']:.2f} |",
            *[f"| of which {p} | {medians['local'][p]:.2f} | {medians['ray'][p]:.2f} |" for p in PHASES],
            "",
            "| Ray layer on a trivial request (torch engine on both sides) | ms |",
            "|---|---|",
            f"| no-op actor call (round trip) | {overheads['noop_actor_call_ms']:.2f} |",
            f"| compute_logprobs, 2 tokens: local client | {overheads['compute_logprobs_local_ms']:.2f} |",
            f"| compute_logprobs, 2 tokens: Ray client | {overheads['compute_logprobs_ray_ms']:.2f} |",
            f"| overhead (Ray − local) | {overheads['ray_overhead_ms']:.2f} |",
        ]
    )
    name = "bench_ray_tiny" if args.tiny else "bench_ray"
    write_json_atomic(RESULTS_DIR / f"{name}.json", results)
    write_text_atomic(
        RESULTS_DIR / f"{name}.md", f"{results['machine']['cpu']}, {results['machine']['date']}\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
