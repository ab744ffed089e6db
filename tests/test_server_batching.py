"""Step-level batching in the server's scheduler thread: compatible requests share session calls,
each keeps its own seed, and a batched image equals the same request run alone."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.server import adapter
from runtime.server.scheduler import ImageTask, Scheduler

STEPS, DECODER_STEPS = 3, 4


@pytest.fixture(scope="module")
def gen(tiny_engine_dir):
    from runtime.generator import Generator

    with Generator.from_dir(tiny_engine_dir) as g:
        g.folder.negative_features  # noqa: B018  (loaded once, before the threads)
        yield g


def task(gen, prompt, seed, n=1, guidance=None):
    job = gen.start(
        prompt,
        seed=seed,
        steps=STEPS,
        guidance=guidance,
        decoder_steps=DECODER_STEPS,
        decoder_guidance=None,
        num_images=n,
    )
    return ImageTask(job)


def run_all(scheduler, tasks):
    for t in tasks:
        scheduler.submit(t)
    for t in tasks:
        assert t.wait(120), "the scheduler did not finish"
        assert t.status == "succeeded", t.error


def test_the_batch_limit_comes_from_the_graph_specs(gen):
    assert adapter.max_batch(gen) == 4  # dit_step, unet_step, vae_decoder: dynamic batch 1..4
    with pytest.raises(ValueError, match="max_batch must be in"):
        Scheduler(gen, max_batch=5)


def test_batched_images_equal_each_request_alone(gen):
    scheduler = Scheduler(gen)  # max_batch 4, max_running 4
    try:
        # rows 1 + 1 + 2 = 4: one call per step for all three requests
        tasks = [
            task(gen, "a red circle", 1),
            task(gen, "a blue square", 2),
            task(gen, "a green triangle", 3, n=2),
        ]
        jobs = [t.job for t in tasks]  # a finished task lets its job go
        run_all(scheduler, tasks)
        assert all(t.job is None for t in tasks)
        assert scheduler.calls["dit"] == STEPS and scheduler.calls["unet"] == DECODER_STEPS
        assert scheduler.calls["vae_decoder"] == 1 and scheduler.calls["prefill"] == 3
        for t, job in zip(tasks, jobs):
            p = job.params
            assert t.seed == p.seed
            alone = gen.generate(
                job.prompt,
                seed=p.seed,
                steps=STEPS,
                decoder_steps=DECODER_STEPS,
                num_images=p.num_images,
            )
            for got, ref in zip(t.images, alone):
                got, ref = np.asarray(got, np.int16), np.asarray(ref, np.int16)
                # fp32 tolerance: a batched matmul may round differently, at most one level
                assert np.abs(got - ref).max() <= 1
                assert (got == ref).mean() > 0.99
        # the seeds are per request: the two images of one request differ, as alone
        a, b = (np.asarray(x) for x in tasks[2].images)
        assert not np.array_equal(a, b)
    finally:
        scheduler.close()


def test_incompatible_requests_do_not_share_a_call(gen):
    scheduler = Scheduler(gen)
    try:
        tasks = [
            task(gen, "two blue squares", 1, guidance=3.0),  # inked at 3 + 4 steps
            task(gen, "two blue squares", 1, guidance=2.0),
        ]
        run_all(scheduler, tasks)
        assert scheduler.calls["dit"] == 2 * STEPS  # guidance differs: one call each per step
        # the first ran ahead (oldest first), so the two never meet at one UNet step either
        assert scheduler.calls["unet"] == 2 * DECODER_STEPS
        assert not np.array_equal(np.asarray(tasks[0].images[0]), np.asarray(tasks[1].images[0]))
    finally:
        scheduler.close()


def test_rows_over_the_limit_are_split(gen):
    scheduler = Scheduler(gen, max_running=8)
    try:
        tasks = [task(gen, "a red circle", s) for s in range(6)]
        run_all(scheduler, tasks)
        assert scheduler.calls["dit"] == 2 * STEPS  # 4 + 2 rows
    finally:
        scheduler.close()


def test_one_at_a_time(gen):
    scheduler = Scheduler(gen, max_batch=1, max_running=1)
    try:
        tasks = [task(gen, "a red circle", s) for s in range(3)]
        run_all(scheduler, tasks)
        assert scheduler.calls["dit"] == 3 * STEPS and scheduler.calls["vae_decoder"] == 3
    finally:
        scheduler.close()


def test_a_chat_answer_interleaves_with_image_calls(gen):
    """Each scheduler turn decodes one token of every answer, then makes one image call: an
    answer finishes while a long image request runs, and equals `Generator.answer`."""
    from runtime.params import AnswerParams
    from runtime.server.scheduler import ChatTask
    from tests.simulated_device import picture

    events: list[tuple[str, str]] = []
    image = gen.start("a red circle", seed=1, steps=20, decoder_steps=20)
    chat = ChatTask(picture(), "Describe the image.", AnswerParams(max_new_tokens=6))
    image_task = ImageTask(image)
    image_task.on_event = lambda kind, t, payload: events.append(("image", kind))
    chat.on_event = lambda kind, t, payload: events.append(("chat", kind))
    scheduler = Scheduler(gen)
    try:
        scheduler.submit(image_task)
        scheduler.submit(chat)
        assert chat.wait(120) and image_task.wait(120)
    finally:
        scheduler.close()
    assert chat.status == "succeeded" and image_task.status == "succeeded", chat.error
    assert chat.result.text == gen.answer(picture(), "Describe the image.", max_new_tokens=6)
    chat_done = events.index(("chat", "done"))
    assert ("image", "progress") in events[:chat_done]  # image calls ran during the answer
    assert events.index(("image", "done")) > chat_done  # and the answer did not wait for it
    assert scheduler.calls["decode"] == chat.result.completion_tokens - 1 + (
        chat.job.finish_reason == "eos"
    )
