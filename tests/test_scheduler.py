"""The server's scheduler over scripted sessions (tests/fake_sessions.py): step-level batching,
cancellation, a failure that stays in its own request, chat interleaved with images, shedding,
without exporting anything or starting a web server."""

import time

import numpy as np
import pytest

from runtime.errors import Cancelled, ResultError
from runtime.folder.engine_folder import EngineFolder
from runtime.generator import Generator
from runtime.params import AnswerParams
from runtime.server.scheduler import ChatTask, ImageTask, QueueFull, Scheduler
from tests.fake_sessions import Script, ScriptedGraphs, fake_folder
from tests.simulated_device import picture

FAST = dict(steps=3, decoder_steps=2)
TIMEOUT = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fake_folder(tmp_path_factory.mktemp("fake") / "tiny-fake")


@pytest.fixture
def served(folder):
    """(Generator, its scripted graphs, a scheduler factory); every scheduler is closed after."""
    graphs = ScriptedGraphs(Script(answer=list(range(20, 26)), eos=None))
    gen = Generator(EngineFolder(folder), open_graph=graphs)
    made = []

    def scheduler(**kwargs):
        made.append(Scheduler(gen, **kwargs))
        return made[-1]

    yield gen, graphs, scheduler
    for s in made:
        s.close()


def alone(folder, prompt, **settings):
    gen = Generator(EngineFolder(folder), open_graph=ScriptedGraphs())
    return np.asarray(gen.generate(prompt, **FAST, **settings)[0])


def wait_all(tasks):
    for task in tasks:
        assert task.wait(TIMEOUT), f"{task} did not finish"


def test_alike_requests_share_calls_and_draw_what_they_draw_alone(served, folder):
    gen, graphs, scheduler = served
    s = scheduler(max_batch=4)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    with gen.lock:  # the thread admits all three before its first call
        tasks = [ImageTask(gen.start(p, **FAST, seed=i)) for i, p in enumerate(prompts)]
        for task in tasks:
            s.submit(task)
    wait_all(tasks)
    assert [t.status for t in tasks] == ["succeeded"] * 3
    rows = [len(c["latents"]) for c in graphs.calls("dit_step")]
    assert max(rows) == 3 and sum(rows) == 3 * FAST["steps"]  # batched, each row stepped once
    assert graphs.log.count("prefill") == 3  # prefills one by one
    for i, (task, prompt) in enumerate(zip(tasks, prompts)):
        assert np.array_equal(np.asarray(task.images[0]), alone(folder, prompt, seed=i))
        assert task.seed == i


def test_batches_stop_at_max_batch(served):
    gen, graphs, scheduler = served
    s = scheduler(max_batch=2)
    with gen.lock:
        tasks = [ImageTask(gen.start("a red circle", **FAST, seed=i)) for i in range(3)]
        for task in tasks:
            s.submit(task)
    wait_all(tasks)
    assert max(len(c["latents"]) for c in graphs.calls("dit_step")) == 2


def test_a_cancelled_request_ends_cancelled_and_the_others_go_on(served):
    gen, _, scheduler = served
    s = scheduler()
    with gen.lock:
        keep, drop = (ImageTask(gen.start("a red circle", **FAST)) for _ in range(2))
        s.submit(keep)
        s.submit(drop)
        drop.cancel()
    wait_all([keep, drop])
    assert keep.status == "succeeded" and drop.status == "cancelled"
    assert isinstance(drop.error, Cancelled)


def test_a_nan_fails_only_its_own_request(served, folder):
    graphs = ScriptedGraphs(Script(nan_at=("vae_decoder", 0, 1)))  # the second row of the call
    gen = Generator(EngineFolder(folder), open_graph=graphs)
    s = Scheduler(gen, max_batch=4)
    try:
        with gen.lock:
            tasks = [ImageTask(gen.start("a red circle", **FAST, seed=i)) for i in range(2)]
            for task in tasks:
                s.submit(task)
        wait_all(tasks)
    finally:
        s.close()
    # one batched vae call whose second row is NaN: that request fails, the other succeeds
    assert graphs.calls("vae_decoder")[0]["latents"].shape[0] == 2
    assert [t.status for t in tasks] == ["succeeded", "failed"]
    assert isinstance(tasks[1].error, ResultError) and len(tasks[0].images) == 1


def test_a_chat_answer_interleaves_with_an_image_request(served):
    gen, graphs, scheduler = served
    s = scheduler()
    with gen.lock:
        image = ImageTask(gen.start("a red circle", steps=20, decoder_steps=20))
        chat = ChatTask(picture(), "Describe the image.", AnswerParams(max_new_tokens=5))
        s.submit(image)
        s.submit(chat)
    wait_all([image, chat])
    assert chat.status == "succeeded" and image.status == "succeeded"
    assert chat.result.completion_tokens == 5 and chat.result.finish_reason == "length"
    log = graphs.log
    first, last = log.index("decode"), len(log) - 1 - log[::-1].index("decode")
    assert "dit_step" in log[first:last]  # image calls ran between the answer's tokens
    assert log.index("vae_decoder") > last  # the answer did not wait for the image


def test_a_full_queue_sheds(served):
    gen, _, scheduler = served
    s = scheduler(max_queue=1, max_running=1)
    with gen.lock:  # the thread admits the first and waits for the lock; the queue holds one
        first = ImageTask(gen.start("a red circle", **FAST))
        s.submit(first)
        deadline = time.monotonic() + TIMEOUT
        while s.running() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = ImageTask(gen.start("a red circle", **FAST))
        s.submit(second)
        with pytest.raises(QueueFull, match=r"max 1"):
            s.submit(ImageTask(gen.start("a red circle", **FAST)))
    wait_all([first, second])
    assert first.status == second.status == "succeeded"
