"""On a CPU every client of a process computes on one thread (futures.py: libgomp throttles its workers' waiting
once the OpenMP teams of several computing threads outnumber the CPUs, and each small kernel then waits for them
to wake). Requests keep their order, and a call made from that thread runs at once instead of waiting on itself."""

import threading

import pytest
import torch

from rlhfkit.engine import Datum, ModelInput, ServiceClient
from rlhfkit.engine.futures import COMPUTE_THREAD_NAME, RequestQueue, on_compute_thread, uses_compute_thread


def test_cpu_clients_compute_on_the_one_compute_thread(tiny_model_dir):
    service = ServiceClient(dtype="float32")
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=0)
    seen: list[str] = []

    def loss(data, logprobs):
        seen.append(threading.current_thread().name)
        return -sum(lp.sum() for lp in logprobs), {}

    tokens = list(range(10, 30))
    datum = Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * 19})
    trainer.forward_backward_custom([datum], loss).result()
    sampler = trainer.save_weights_and_get_sampling_client()
    base = service.create_sampling_client(base_model=tiny_model_dir)
    hooks = [
        s.model.register_forward_pre_hook(lambda *_: seen.append(threading.current_thread().name))
        for s in (sampler, base)
    ]
    sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()
    base.compute_logprobs(ModelInput.from_ints(tokens)).result()
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {COMPUTE_THREAD_NAME}
    assert threading.current_thread().name != COMPUTE_THREAD_NAME
    assert on_compute_thread(torch.device("cpu"), lambda: threading.current_thread().name) == COMPUTE_THREAD_NAME


def test_shared_queues_keep_submission_order_and_a_call_from_the_thread_runs_at_once():
    first, second = RequestQueue("a", shared=True), RequestQueue("b", shared=True)
    order: list[int] = []
    futures = [(first if i % 2 else second).submit(order.append, i) for i in range(20)]
    for future in futures:
        future.result(timeout=30)
    assert order == list(range(20))
    nested = first.submit(lambda: on_compute_thread("cpu", lambda: threading.current_thread().name))
    assert nested.result(timeout=30) == COMPUTE_THREAD_NAME  # inline: waiting on itself would never end
    # a request that waits for a later one on the same thread is refused instead of hanging
    waits = first.submit(lambda: second.submit(lambda: 1).result())
    with pytest.raises(RuntimeError, match="would never run"):
        waits.result(timeout=30)


def test_only_cpu_clients_share_the_thread():
    assert uses_compute_thread(torch.device("cpu")) and uses_compute_thread("cpu")
    assert not uses_compute_thread(torch.device("cuda")) and not uses_compute_thread("cuda")
    own = RequestQueue("rlhfkit-own")
    assert own.submit(lambda: threading.current_thread().name).result(timeout=30) == "rlhfkit-own"


def test_a_forked_child_starts_its_own_compute_thread():
    import os

    assert RequestQueue("parent", shared=True).submit(lambda: 1).result(timeout=30) == 1  # the parent's exists
    pid = os.fork()
    if pid == 0:  # the child: a submission must run (the parent's thread is not there)
        try:
            ok = RequestQueue("child", shared=True).submit(lambda: 2).result(timeout=30) == 2
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
