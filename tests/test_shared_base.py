"""One frozen base per (model, device, dtype) in a process, shared by every client: a client holds only its adapter
(and, training, its optimizer state); training one client changes no other client's outputs; the base weights are
never written; dropped sampling clients are freed; outputs equal the former private-copy engine (fp32)."""

import copy
import gc
import weakref

import pytest
import torch

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.model import base as models

# What a sampling client may hold beyond its adapter's tensors: rotary frequencies and the like (measured: 0 bytes
# on the tiny Qwen2; the bound leaves room for other architectures' small tensor attributes).
FIXED_OVERHEAD_BYTES = 64 << 10


@pytest.fixture(scope="module")
def service():
    return ServiceClient()


@pytest.fixture(scope="module")
def tokenizer(service, tiny_model_dir):
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def ce_datum(tokens):
    return Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def own_bytes(model, base_model, precision) -> int:
    """Tensor bytes `model` holds beyond the process's shared base tensors."""
    return models.tensor_bytes(models.model_tensors(model), exclude=models.shared_tensors(base_model, precision))


def adapter_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in tensors.values())  # kept in fp32


def base_checksum(base_model, precision) -> list[float]:
    return [float(t.double().sum()) for t in models.shared_tensors(base_model, precision) if t.is_floating_point()]


def test_each_sampling_client_costs_its_adapter_not_a_base_copy(service, tiny_model_dir, tokenizer):
    """8 sampling clients held from one training client: each holds at most its adapter plus
    FIXED_OVERHEAD_BYTES of tensors of its own; everything else is the shared base's tensors, never copied."""
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=0)
    precision = service.precision
    base_bytes = models.tensor_bytes(models.shared_tensors(tiny_model_dir, precision))
    tokens = tokenizer.encode("memory is spent on adapters, not on copies")
    samplers = []
    for _ in range(8):
        trainer.forward_backward([ce_datum(tokens)], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=1e-2))
        samplers.append(trainer.save_weights_and_get_sampling_client())
    adapter = adapter_bytes(trainer.trainer.adapter_tensors())
    assert adapter < base_bytes / 4  # the test means something: an adapter is much smaller than the base
    for sampler in samplers:
        assert own_bytes(sampler.model, tiny_model_dir, precision) <= adapter + FIXED_OVERHEAD_BYTES
    everything = [t for s in samplers for t in models.model_tensors(s.model)] + models.model_tensors(trainer.model)
    held = models.tensor_bytes(everything)
    assert held <= base_bytes + 9 * (adapter + FIXED_OVERHEAD_BYTES)
    # the samplers differ (each has the weights of its step) while sharing the base
    first, last = (s.compute_logprobs(ModelInput.from_ints(tokens)).result() for s in (samplers[0], samplers[-1]))
    assert sum(last[1:]) > sum(first[1:])


def test_training_one_client_leaves_every_other_clients_outputs_unchanged(service, tiny_model_dir, tokenizer):
    tokens = tokenizer.encode("one client trains, the others must not notice")
    datum = ce_datum(tokens)
    trained = service.create_lora_training_client(tiny_model_dir, rank=4, seed=1)
    other = service.create_lora_training_client(tiny_model_dir, rank=4, seed=2)
    base_sampler = service.create_sampling_client(base_model=tiny_model_dir)
    adapter_sampler = trained.save_weights_and_get_sampling_client()
    checksum = base_checksum(tiny_model_dir, service.precision)

    def outputs():
        return (
            other.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist(),
            base_sampler.compute_logprobs(ModelInput.from_ints(tokens)).result(),
            adapter_sampler.compute_logprobs(ModelInput.from_ints(tokens)).result(),
            [
                s.tokens
                for s in base_sampler.sample(ModelInput.from_ints(tokens[:4]), 2, SamplingParams(max_tokens=6, seed=5))
                .result()
                .sequences
            ],
        )

    before = outputs()
    own_before = trained.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    for _ in range(3):
        trained.forward_backward([datum], "cross_entropy")
        trained.optim_step(AdamParams(learning_rate=1e-2))
    own_after = trained.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert sum(own_after) > sum(own_before) + 0.5  # the trained client did change
    assert outputs() == before  # bit for bit
    assert base_checksum(tiny_model_dir, service.precision) == checksum  # the base weights were never written


def _private_copy(base_model, precision):
    """The former engine's base: a deep copy of the weights for every client."""
    return copy.deepcopy(models._cached_base(base_model, precision))


def test_training_equals_a_private_copy_bit_for_bit(service, tiny_model_dir, tokenizer, monkeypatch):
    """The shared base trains exactly as a client's own deep copy of the base did (fp32)."""
    from rlhfkit.engine.torch_engine import trainer as trainer_module
    from rlhfkit.engine.model.lora import LoraSpec

    batch = [ce_datum(tokenizer.encode("bit for bit the same steps")), ce_datum(tokenizer.encode("and another"))]
    adam = AdamParams(learning_rate=5e-3)

    def run(trainer):
        outs = []
        for _ in range(3):
            outs.append(trainer.forward_backward(batch, "cross_entropy", None, True).metrics["loss:sum"])
            trainer.optim_step(adam)
        return outs, trainer.adapter_tensors()

    spec = LoraSpec(tiny_model_dir, rank=4, seed=3)
    shared = run(trainer_module.LoraTrainer(spec, service.precision))
    monkeypatch.setattr(trainer_module, "load_base_model", _private_copy)
    private = run(trainer_module.LoraTrainer(spec, service.precision))
    assert shared[0] == private[0]
    assert shared[1].keys() == private[1].keys()
    assert all(torch.equal(shared[1][k], private[1][k]) for k in shared[1])


def test_adapter_sampler_equals_the_merged_sampler_it_replaces(service, tiny_model_dir, tokenizer):
    """The sampler now applies the adapter in each forward instead of merging it into a copy of the base:
    logprobs and scores agree with the merged model to fp32 rounding, seeded samples are the same tokens."""
    from rlhfkit.engine.model.lora import merge_adapter
    from rlhfkit.engine.torch_engine.sampler import SamplingClient

    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=4)
    tokens = tokenizer.encode("merged or not, the same model")
    for _ in range(3):
        trainer.forward_backward([ce_datum(tokens)], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=2e-2))
    sampler = trainer.save_weights_and_get_sampling_client()
    tensors = trainer._queue.submit(trainer.trainer.adapter_tensors).result()
    merged_model = _private_copy(tiny_model_dir, service.precision)
    merge_adapter(merged_model, tensors, trainer.spec.scale)
    merged = SamplingClient(tiny_model_dir, merged_model, service.precision)

    prompts = [ModelInput.from_ints(tokens), ModelInput.from_ints(tokens[:3])]
    for a, b in zip(sampler.compute_logprobs_batch(prompts), merged.compute_logprobs_batch(prompts)):
        assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) < 1e-5
    scores = zip(sampler.score_next_token_batch(prompts, [10, 20]), merged.score_next_token_batch(prompts, [10, 20]))
    for a, b in scores:
        assert a.argmax_token == b.argmax_token
        assert max(abs(x - y) for x, y in zip(a.candidate_logprobs, b.candidate_logprobs)) < 1e-5
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11)
    ours = sampler.sample(prompts[1], 4, params).result().sequences
    theirs = merged.sample(prompts[1], 4, params).result().sequences
    assert [s.tokens for s in ours] == [s.tokens for s in theirs]
    for a, b in zip(ours, theirs):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_dropped_sampling_clients_are_freed(service, tiny_model_dir):
    """An RL loop makes a sampler per iteration and drops the last one: nothing keeps a dropped one (or its
    adapter) alive, so memory stays flat over iterations."""
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=5)
    refs = []
    for _ in range(6):
        sampler = trainer.save_weights_and_get_sampling_client()
        sampler.compute_logprobs(ModelInput.from_ints([1, 2, 3, 4])).result()
        refs.append(weakref.ref(sampler.model))
    del sampler
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


ARENA_PROBE = """
import ctypes, re, sys, tempfile, threading
from rlhfkit.engine.model import allocator

if sys.argv[1] == "shared":
    allocator.share_one_arena()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
held = []


def work():  # a client thread's passes: many blocks allocated, then freed
    blocks = [libc.malloc(64 << 10) for _ in range(64)]
    held.extend(blocks[:1])
    for block in blocks[1:]:
        libc.free(block)


barrier = threading.Barrier(4)
threads = [threading.Thread(target=lambda: (barrier.wait(), work())) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(len(re.findall(r'<heap nr="', open(path).read())))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's arenas")
def test_client_threads_share_one_malloc_arena(tmp_path):
    """share_one_arena (called by ServiceClient and every client) makes threads that start afterwards allocate from
    glibc's main arena, so memory one client's thread frees is reused by the next client's passes; without it
    each thread that allocates while others do gets an arena of its own (glibc's malloc_info counts them)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_ARENA_MAX": ""}
    env.pop("MALLOC_ARENA_MAX")

    def arenas(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.strip())

    assert arenas("shared") == 1
    assert arenas("default") > 1


FRAGMENT_PROBE = """
import ctypes
from rlhfkit.engine.model import allocator

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
allocator.trim_if_grown()  # the baseline
start = allocator.resident_bytes()
blocks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MiB in blocks below the mmap threshold, touched
for block in blocks:
    libc.memset(block, 1, 64 << 10)
for i, block in enumerate(blocks):  # every 16th kept: the free holes between them cannot shrink the heap's top
    if i % 16:
        libc.free(block)
fragmented = allocator.resident_bytes()
allocator.TRIM_GROWTH_BYTES = 1 << 40
allocator.trim_if_grown()  # grown by less than the threshold: nothing happens
untrimmed = allocator.resident_bytes()
allocator.TRIM_GROWTH_BYTES = 64 << 20
allocator.trim_if_grown()
print(start, fragmented, untrimmed, allocator.resident_bytes())
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_fragmented_heap_goes_back_to_the_os_once_it_has_grown_by_the_threshold():
    """trim_if_grown (after each trainer and sampler request) returns the free pages between live blocks once
    resident memory has grown by TRIM_GROWTH_BYTES since the last trim, and does nothing below that."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FRAGMENT_PROBE], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    start, fragmented, untrimmed, trimmed = map(int, run.stdout.split())
    assert fragmented - start > 200 << 20  # 240 MiB of free but resident holes
    assert untrimmed >= fragmented - (4 << 20)
    assert trimmed - start < 40 << 20  # the 16 MiB still held, and the pages they share


def test_a_bf16_samplers_adapter_is_kept_in_bf16_with_the_same_outputs(tiny_model_dir):
    """Computing in bf16, a sampler keeps its adapter in bf16 (autocast would cast the fp32 adapter in every
    forward): the logprobs and samples equal those with the adapter left in fp32, bit for bit."""
    from rlhfkit.engine.torch_engine.sampler import SamplingClient

    service = ServiceClient(dtype="bfloat16")
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=0).trainer
    tensors = {k: torch.randn_like(v) * 0.05 for k, v in trainer.adapter_tensors().items()}
    kept, cast = (SamplingClient.from_adapter(trainer.spec, tensors, trainer.precision) for _ in range(2))
    lora = [p for n, p in kept.model.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    for name, param in cast.model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()  # as autocast sees it without the cast at load
    prompt = ModelInput.from_ints([(11 * i) % 400 + 10 for i in range(23)])
    assert kept.compute_logprobs(prompt).result() == cast.compute_logprobs(prompt).result()
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a, b = (c.sample(prompt, 3, params).result() for c in (kept, cast))
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.logprobs for s in a.sequences] == [s.logprobs for s in b.sequences]
