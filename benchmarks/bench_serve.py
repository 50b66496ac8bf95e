"""What `rlhfkit serve` adds: the same work in-process (rlhfkit.engine.ServiceClient) and through the real tinker
SDK (0.38) against a `rlhfkit serve` subprocess on 127.0.0.1, alternating in one run (A, B, A, B, ...).

1. SFT steps of the demo (preset=demo: the embedded SmolLM2-135M-Instruct, LoRA rank 16, batches of 4 LIMA
   conversations of <= 256 tokens built by rlhfkit's LimaBuilder, lr 3e-4): `forward_backward(batch,
   "cross_entropy")` + `optim_step`, timed two ways: *sequential* (wait for each, as rlhfkit.supervised.train
   does) and *pipelined* (submit both, then wait, as tinker-cookbook's supervised loop does). Both sides start
   from the same LoRA seed and get the same batches, so their losses must agree (checked, reported).
2. One RL-iteration-like step (demo sizes: 4 prompts x a group of 4, 48 new tokens, temperature 1): sample the
   groups from a sampler on the current weights (the four requests at once, gathered), `forward_backward(...,
   "importance_sampling")` + `optim_step` on the 16 sequences, then `save_weights_and_get_sampling_client`
   (judging, which is more sampling, is left out). Seeds are the same on both sides; the sampled tokens agree
   in fp32, and in bf16 only when the same requests share a sampling batch (reported, with the token counts).
3. Trivial requests over loopback, one at a time: `GET healthz` and `POST get_info` (plain httpx; the SDK caches
   get_info), and a 1-token `sample` of a short prompt through the SDK against the same in-process call;
   requests per second = 1 / median latency.
4. The SFT step's overhead from its parts, which the machine's load moves much less than whole steps: the same
   step on a 3-token datum on both sides (the two round trips, futures included, almost no compute), and the
   (de)serialisation of the real batch and its output, timed with the code each side runs.

The server runs the same source tree as this script (PYTHONPATH), in the same dtype, on the same cores: while
one side computes, the other idles. Results go to benchmarks/results/serve.json and serve.md. `--tiny` runs a
small random model for a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common
import httpx
import tinker
from tinker import types as tt

from rlhfkit.engine import ServiceClient
from rlhfkit.engine import types as et

REPO = Path(__file__).resolve().parent.parent
API_KEY = "tml-bench-serve"
# preset=demo (rlhfkit/recipes/preference/rlhf/pipeline_config.py): SFT and RL sizes
DEMO = dict(lora_rank=16, max_length=256, sft_batch_size=4, sft_learning_rate=3e-4, rl_batch_size=4, rl_group_size=4)
RL_MAX_TOKENS = 48
RL_LEARNING_RATE = 2e-4
ADAM = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)


# ------------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(storage: Path, dtype: str, log: Path):
    """`python -m rlhfkit serve` on loopback (this source tree), yielding its URL; stopped at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "rlhfkit", "serve", "--port", str(port), "--storage", str(storage), f"dtype={dtype}"]
    cmd += ["--log-level", "info"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rlhfkit serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"rlhfkit serve did not answer in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        watchdog = threading.Thread(target=_exit_if_dead, args=(proc, log), daemon=True)
        watchdog.start()
        yield url
    finally:
        proc.stopping = True  # type: ignore[attr-defined]
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _exit_if_dead(proc: subprocess.Popen, log: Path) -> None:
    """A server that dies mid-run would leave the SDK retrying for minutes: stop the benchmark at once."""
    while proc.poll() is None:
        time.sleep(1.0)
    if not getattr(proc, "stopping", False):
        print(f"rlhfkit serve died mid-run (exit status {proc.returncode}); its log:", file=sys.stderr)
        print(log.read_text()[-3000:], file=sys.stderr, flush=True)
        os._exit(3)


# ------------------------------------------------------------------------------------------------------
# The same data as engine and SDK types


def to_sdk(datum: et.Datum) -> tt.Datum:
    return tt.Datum(
        model_input=tt.ModelInput.from_ints(datum.model_input.to_ints()),
        loss_fn_inputs={k: tt.TensorData.from_numpy(np.asarray(v.to_numpy())) for k, v in datum.loss_fn_inputs.items()},
    )


def prompt_of(datum: et.Datum) -> list[int]:
    """The conversation up to its first trained token (the prompt a policy would reply to)."""
    weights = np.asarray(datum.loss_fn_inputs["weights"].to_numpy())
    first = int(np.flatnonzero(weights > 0)[0])
    return datum.model_input.to_ints()[: first + 1]


def rl_datums(prompts: list[list[int]], groups: list[Any], sdk: bool) -> list:
    """importance_sampling datums of the sampled groups; advantages: reply length centred within the group
    (a stand-in for the tournament's rewards, the same function of the same samples on both sides)."""
    out = []
    for prompt, group in zip(prompts, groups):
        lengths = np.array([len(s.tokens) for s in group.sequences], dtype=np.float32)
        advantages = lengths - lengths.mean()
        for seq, adv in zip(group.sequences, advantages):
            tokens = prompt + list(seq.tokens)
            n = len(tokens) - 1
            pad = len(prompt) - 1
            inputs = {
                "target_tokens": np.array(tokens[1:], dtype=np.int64),
                "logprobs": np.r_[np.zeros(pad), np.asarray(seq.logprobs)].astype(np.float32),
                "advantages": np.r_[np.zeros(pad), np.full(n - pad, adv)].astype(np.float32),
            }
            if sdk:
                out.append(
                    tt.Datum(
                        model_input=tt.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={k: tt.TensorData.from_numpy(v) for k, v in inputs.items()},
                    )
                )
            else:
                out.append(et.Datum(et.ModelInput.from_ints(tokens[:-1]), inputs))
    return out


# ------------------------------------------------------------------------------------------------------
# The two sides: the same calls, engine types or SDK types


class Side:
    def __init__(self, name: str, trainer: Any, types: Any, resolve: Callable[[Any], Any]):
        self.name, self.trainer, self.types, self.resolve = name, trainer, types, resolve
        self.sampler: Any = None

    def adam(self, lr: float):
        return self.types.AdamParams(learning_rate=lr, **ADAM)

    def sft_step(self, batch: list, lr: float, pipelined: bool) -> float:
        """One forward_backward + optim_step; returns the loss (loss:sum)."""
        if pipelined:
            fb = self.trainer.forward_backward(batch, "cross_entropy")
            op = self.trainer.optim_step(self.adam(lr))
            out = fb.result()
            op.result()
        else:
            out = self.trainer.forward_backward(batch, "cross_entropy").result()
            self.trainer.optim_step(self.adam(lr)).result()
        return float(out.metrics["loss:sum"])

    def new_sampler(self) -> None:
        self.sampler = self.resolve(self.trainer.save_weights_and_get_sampling_client())

    def sample_groups(self, prompts: list[list[int]], group: int, seed: int) -> list:
        """The groups' requests at once, gathered (as rlhfkit's and the cookbook's RL loops do): the engine's
        `sample_async` batches concurrent requests (its sync `sample` runs each alone); the SDK's `sample`
        futures are awaited, and the server batches them with `sample_async`."""
        params = self.types.SamplingParams(max_tokens=RL_MAX_TOKENS, temperature=1.0, seed=seed)
        call = self.sampler.sample if self.types is tt else self.sampler.sample_async

        async def gather() -> list:
            return list(
                await asyncio.gather(*[call(self.types.ModelInput.from_ints(p), group, params) for p in prompts])
            )

        return asyncio.run(gather())

    def rl_step(self, prompts: list[list[int]], group: int, seed: int) -> tuple[dict[str, float], list]:
        t0 = time.perf_counter()
        groups = self.sample_groups(prompts, group, seed)
        t1 = time.perf_counter()
        data = rl_datums(prompts, groups, sdk=self.types is tt)
        self.trainer.forward_backward(data, "importance_sampling").result()
        self.trainer.optim_step(self.adam(RL_LEARNING_RATE)).result()
        t2 = time.perf_counter()
        self.new_sampler()
        t3 = time.perf_counter()
        tokens = sum(len(s.tokens) for g in groups for s in g.sequences)
        times = {"sample": t1 - t0, "train": t2 - t1, "sync_weights": t3 - t2, "total": t3 - t0, "tokens": tokens}
        return times, [[list(s.tokens) for s in g.sequences] for g in groups]

    def one_token(self, prompt: list[int]) -> None:
        params = self.types.SamplingParams(max_tokens=1, temperature=1.0, seed=0)
        self.sampler.sample(self.types.ModelInput.from_ints(prompt), 1, params).result()


def serialisation_ms(local: Side, batch: list) -> dict[str, float]:
    """Median ms of each (de)serialisation an SFT step's forward_backward goes through on the wire: the SDK's
    encoding of the request, the server's decoding of it (rlhfkit.serve.wire), the server's encoding of the
    output, the SDK's decoding of it."""
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_forward_backward_output

    from rlhfkit.serve import wire

    sdk_batch = [to_sdk(d) for d in batch]
    output = local.trainer.forward(batch, "cross_entropy").result()

    def encode_request() -> bytes:
        request = tt.ForwardBackwardRequest(
            forward_backward_input=tt.ForwardBackwardInput(data=sdk_batch, loss_fn="cross_entropy"),
            model_id="session-x:train:0",
            seq_id=1,
        )
        return forward_backward_request_to_proto(request).SerializeToString()

    body = encode_request()
    out_bytes = wire.forward_backward_output(output)
    parts = {
        "sdk_encode_request": encode_request,
        "server_decode_request": lambda: wire.data_from_proto(wire.parse_forward_backward(body)),
        "server_encode_output": lambda: wire.forward_backward_output(output),
        "sdk_decode_output": lambda: deserialize_forward_backward_output(out_bytes),
    }
    out = {name: 1000 * med([timed(fn)[0] for _ in range(25)]) for name, fn in parts.items()}
    out["total"] = sum(out.values())
    out["request_bytes"] = len(body)
    out["output_bytes"] = len(out_bytes)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def latencies(fn: Callable[[], Any], seconds: float, at_least: int = 5) -> list[float]:
    out, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(out) < at_least:
        out.append(timed(fn)[0])
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed SFT steps per side and mode (after 1 warm-up)")
    parser.add_argument("--rl-reps", type=int, default=2, help="timed RL-like steps per side (after 1 warm-up)")
    parser.add_argument("--rps-seconds", type=float, default=3.0, help="seconds per trivial-request measurement")
    parser.add_argument("--dtype", default="auto", help="engine dtype on both sides (auto: bf16 where native)")
    parser.add_argument("--tiny", action="store_true", help="a small random model (checks the script, ~1 min)")
    parser.add_argument("--out", default="serve", help="results stem under benchmarks/results")
    args = parser.parse_args()

    import torch

    common.warn_if_busy()
    base_model = common.workload_model(args.tiny)
    n_sft = 2 * (args.steps + 1)  # each mode gets its own batches; both sides the same ones
    batches = common.sft_batches(base_model, DEMO["sft_batch_size"], DEMO["max_length"], n_sft)
    prompts = [prompt_of(batches[0][k]) for k in range(DEMO["rl_batch_size"])]
    info = common.machine_info(torch.get_num_threads())
    info["avx512_bf16"] = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    lora = dict(rank=DEMO["lora_rank"], seed=0, train_mlp=True, train_attn=True, train_unembed=True)
    results: dict[str, Any] = {}
    started = time.perf_counter()

    with serve(tmp / "storage", args.dtype, tmp / "server.log") as url:
        engine = ServiceClient(dtype=args.dtype, storage_dir=str(tmp / "engine"))
        sdk = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        local = Side("in-process", engine.create_lora_training_client(base_model, **lora), et, lambda c: c)
        remote = Side(
            "tinker SDK -> rlhfkit serve",
            sdk.create_lora_training_client(base_model=base_model, **lora).result(),
            tt,
            lambda f: f.result(),
        )
        dtype = str(engine.precision.compute_dtype).removeprefix("torch.")
        print(f"{base_model}, dtype {dtype}, server {url}", flush=True)

        # 1. SFT steps, alternating
        k = 0
        for mode in ("sequential", "pipelined"):
            series: dict[str, list[float]] = {"in-process": [], "sdk": []}
            losses: dict[str, list[float]] = {"in-process": [], "sdk": []}
            for step in range(args.steps + 1):
                batch = batches[k]
                k += 1
                sdk_batch = [to_sdk(d) for d in batch]  # built outside the timing (a cookbook builds SDK datums)
                for key, side, data in (("in-process", local, batch), ("sdk", remote, sdk_batch)):
                    seconds, loss = timed(lambda: side.sft_step(data, DEMO["sft_learning_rate"], mode == "pipelined"))
                    losses[key].append(loss)
                    if step > 0:
                        series[key].append(seconds)
                print(f"sft {mode} step {step}: {series['in-process'][-1:]} {series['sdk'][-1:]}", flush=True)
            a, b = med(series["in-process"]), med(series["sdk"])
            paired = [y / x for x, y in zip(series["in-process"], series["sdk"])]
            loss_diff = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(losses["in-process"], losses["sdk"]))
            results[f"sft_{mode}"] = {
                "seconds": series,
                "median_s": {"in-process": a, "sdk": b},
                "overhead_ms": 1000 * (b - a),
                "ratio_of_medians": b / a,
                "median_paired_ratio": med(paired),
                "losses": losses,
                "max_relative_loss_difference": loss_diff,
                "tokens_per_step": sum(d.model_input.length for d in batch),
            }

        # 2. RL-iteration-like steps, alternating
        local.new_sampler()
        remote.new_sampler()
        rl: dict[str, list[dict[str, float]]] = {"in-process": [], "sdk": []}
        same_tokens = []
        for rep in range(args.rl_reps + 1):
            seed = 1000 + rep
            t_local, tok_local = local.rl_step(prompts, DEMO["rl_group_size"], seed)
            t_remote, tok_remote = remote.rl_step(prompts, DEMO["rl_group_size"], seed)
            same_tokens.append(tok_local == tok_remote)
            if rep > 0:
                rl["in-process"].append(t_local)
                rl["sdk"].append(t_remote)
            print(f"rl step {rep}: {t_local} in-process, {t_remote} sdk", flush=True)
        phases = ("sample", "train", "sync_weights", "total", "tokens")
        rl_med = {key: {p: med([t[p] for t in rl[key]]) for p in phases} for key in rl}
        results["rl_step"] = {
            "seconds": rl,
            "median_s": rl_med,
            "ratio_of_medians": {p: rl_med["sdk"][p] / rl_med["in-process"][p] for p in phases},
            "overhead_ms": {p: 1000 * (rl_med["sdk"][p] - rl_med["in-process"][p]) for p in phases[:-1]},
            "same_sampled_tokens": same_tokens,
            "sample_ms_per_token": {key: 1000 * med([t["sample"] / t["tokens"] for t in rl[key]]) for key in rl},
            "prompts": len(prompts),
            "group_size": DEMO["rl_group_size"],
            "max_tokens": RL_MAX_TOKENS,
        }

        # 3. Trivial requests, one at a time
        short = prompts[0][:8]
        headers = {"X-API-Key": API_KEY}
        with httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=30) as http:
            model_id = remote.trainer.model_id
            trivial = {
                "healthz (httpx GET)": lambda: http.get("/healthz").raise_for_status(),
                "get_info (httpx POST)": lambda: http.post("/get_info", json={"model_id": model_id}).raise_for_status(),
            }
            for _ in range(5):  # warm-up
                for fn in trivial.values():
                    fn()
                local.one_token(short)
                remote.one_token(short)
            rps: dict[str, Any] = {}
            for name, fn in trivial.items():
                lat = latencies(fn, args.rps_seconds)
                rps[name] = {"median_ms": 1000 * med(lat), "requests_per_s": 1 / med(lat), "n": len(lat)}
            for name, side in (("1-token sample, in-process", local), ("1-token sample, tinker SDK", remote)):
                lat = latencies(lambda side=side: side.one_token(short), args.rps_seconds)
                rps[name] = {"median_ms": 1000 * med(lat), "requests_per_s": 1 / med(lat), "n": len(lat)}
            results["trivial_requests"] = rps

        # 4. The SFT step's overhead from its parts (less exposed to the machine's load than whole steps):
        # a step on a 3-token datum (the same two round trips, almost no compute), alternating, plus the
        # (de)serialisation of the real batch and its output, timed here with the code each side runs
        tiny_ids = prompts[0][:4]
        tiny = et.Datum(
            et.ModelInput.from_ints(tiny_ids[:-1]),
            {"target_tokens": np.array(tiny_ids[1:], dtype=np.int64), "weights": np.ones(3, dtype=np.float32)},
        )
        tiny_steps: dict[str, list[float]] = {"in-process": [], "sdk": []}
        for rep in range(max(12, 3 * args.steps) + 2):
            for key, side, data in (("in-process", local, [tiny]), ("sdk", remote, [to_sdk(tiny)])):
                seconds, _ = timed(lambda: side.sft_step(data, 0.0, pipelined=False))
                if rep >= 2:
                    tiny_steps[key].append(seconds)
        results["tiny_step"] = {
            "seconds": tiny_steps,
            "median_ms": {k: 1000 * med(v) for k, v in tiny_steps.items()},
            "round_trips_ms": 1000 * (med(tiny_steps["sdk"]) - med(tiny_steps["in-process"])),
        }
        results["serialisation_ms"] = serialisation_ms(local, batches[0])
        sdk.close("success").result()

    info["load_at_end"] = common.load_snapshot()
    payload = {
        "benchmark": "bench_serve",
        "what": __doc__,
        "settings": {
            "base_model": base_model,
            "dtype": dtype,
            "steps": args.steps,
            "rl_reps": args.rl_reps,
            "rps_seconds": args.rps_seconds,
            **DEMO,
            "rl_max_tokens": RL_MAX_TOKENS,
            "tinker_sdk": tinker.__version__,
        },
        "machine": info,
        "note": (
            "taken on a shared 2-core machine: other agents' tests and pipelines ran at the same time (load averages "
            "and busiest processes above), so absolute times are noisy; A and B alternate step by step, so both "
            "sides see the same load on average"
        ),
        "wall_s": time.perf_counter() - started,
        "results": results,
    }
    common.write_results(args.out, payload, markdown(payload))


def markdown(p: dict[str, Any]) -> str:
    r, s, m = p["results"], p["settings"], p["machine"]
    lines = [
        "# rlhfkit serve: the tinker SDK over loopback against the engine in-process",
        "",
        f"{m['date']}, `{m['command']}`; {m['cpu']} ({m['cores']} cores, avx512_bf16: "
        f"{'yes' if m['avx512_bf16'] else 'no'}), torch {m['torch']}, {m['torch_threads']} threads, "
        f"{s['base_model']} in {s['dtype']}, tinker SDK {s['tinker_sdk']}. {p['note'][0].upper()}{p['note'][1:]}. "
        f"Load average at start {m['load_at_start']['loadavg_1m']:.2f}, at end {m['load_at_end']['loadavg_1m']:.2f}.",
        "",
        "| workload | in-process (median s) | tinker SDK -> rlhfkit serve (median s) | SDK / in-process | added (ms) |",
        "|---|---|---|---|---|",
    ]
    for mode in ("sequential", "pipelined"):
        x = r[f"sft_{mode}"]
        lines.append(
            f"| SFT step, {mode} ({s['sft_batch_size']} LIMA rows, {x['tokens_per_step']} tokens; "
            f"{len(x['seconds']['sdk'])} steps each) | {x['median_s']['in-process']:.3f} | {x['median_s']['sdk']:.3f} "
            f"| {x['ratio_of_medians']:.3f} (paired {x['median_paired_ratio']:.3f}) | {x['overhead_ms']:.0f} |"
        )
    x = r["rl_step"]
    for phase in ("total", "sample", "train", "sync_weights"):
        lines.append(
            f"| RL-like step: {phase} ({x['prompts']} prompts x {x['group_size']}, {x['max_tokens']} tokens; "
            f"{len(x['seconds']['sdk'])} each) | {x['median_s']['in-process'][phase]:.3f} | "
            f"{x['median_s']['sdk'][phase]:.3f} | {x['ratio_of_medians'][phase]:.3f} | {x['overhead_ms'][phase]:.0f} |"
        )
    t, z, seq = r["tiny_step"], r["serialisation_ms"], r["sft_sequential"]
    estimate = t["round_trips_ms"] + z["total"]
    step_ms = 1000 * seq["median_s"]["in-process"]
    lines += [
        "",
        f"The SFT step's overhead from its parts: a step on a 3-token datum takes {t['median_ms']['in-process']:.1f} ms "
        f"in-process and {t['median_ms']['sdk']:.1f} ms through the SDK ({t['round_trips_ms']:.1f} ms for the two round "
        f"trips, forward_backward and optim_step, futures included); the real batch's (de)serialisation adds "
        f"{z['total']:.1f} ms (request {z['request_bytes'] / 1024:.0f} KiB, output {z['output_bytes'] / 1024:.0f} KiB: "
        + ", ".join(f"{k} {v:.2f}" for k, v in z.items() if k.endswith(("request", "output")) and "bytes" not in k)
        + f" ms). Together {estimate:.0f} ms, {100 * estimate / step_ms:.1f}% of the in-process step's median "
        f"({step_ms:.0f} ms).",
    ]
    lines += ["", "| trivial request (one at a time) | median ms | requests/s |", "|---|---|---|"]
    for name, v in r["trivial_requests"].items():
        lines.append(f"| {name} | {v['median_ms']:.2f} | {v['requests_per_s']:.0f} |")
    lines += [
        "",
        f"Same work on both sides: SFT losses agree to {max(r[f'sft_{k}']['max_relative_loss_difference'] for k in ('sequential', 'pipelined')):.1e} "
        f"(relative); RL-like steps sampled the same tokens: {r['rl_step']['same_sampled_tokens']}"
        + (
            ""
            if all(r["rl_step"]["same_sampled_tokens"])
            else " (in bf16, which requests share a sampling batch changes the numbers and so the seeded tokens)"
        )
        + "; sampled tokens per step (median): "
        f"{x['median_s']['in-process']['tokens']:.0f} in-process, {x['median_s']['sdk']['tokens']:.0f} SDK; sampling ms "
        f"per token: {x['sample_ms_per_token']['in-process']:.1f} in-process, {x['sample_ms_per_token']['sdk']:.1f} SDK.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
