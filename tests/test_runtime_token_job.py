"""Understanding as a caller-driven token job: equality with `answer`, finish reasons, sampling,
interleaved jobs that own their KV caches, and a decode graph whose outputs ignore the past."""

import copy

import numpy as np
import pytest

from runtime.errors import Cancelled, UserError
from runtime.folder.engine_folder import EngineFolder
from runtime.folder.graphs import cache_feeds
from runtime.generator import Generator
from runtime.jobs.answer import sample_token, stream_text
from runtime.params import AnswerParams
from tests.simulated_device import picture

QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def gen(tiny_engine_dir):
    with Generator.from_dir(tiny_engine_dir) as g:
        yield g


def run_job(job) -> list[int]:
    ids = []
    while not job.done:
        ids.append(job.generate_next_token())
    return ids


def test_job_equals_answer_and_stops_on_length(gen):
    job = gen.start_answer(picture(), QUESTION, max_new_tokens=7)
    assert not job.is_done() and job.finish_reason is None
    run_job(job)
    assert job.text() == gen.answer(picture(), QUESTION, max_new_tokens=7)
    assert job.finish_reason in ("length", "eos")
    if job.finish_reason == "length":
        assert len(job.tokens) == 7
    with pytest.raises(RuntimeError, match="finished"):
        job.generate_next_token()


def test_a_stream_that_raises_cancels_its_job(gen):
    """A stream callback that stops (its client went away) leaves no job open behind it."""
    job = gen.start_answer(picture(), QUESTION, max_new_tokens=7)
    closed = []
    gen.close_job = closed.append  # the Generator hears of the job's end

    def gone(_text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_text(job, gone)
    del gen.close_job
    assert job.cancelled and job.done and job.capacity == 0  # its cache is freed
    assert closed == [job]
    assert job.prompt_tokens > 0 and len(job.tokens) >= 1


def test_finish_reason_eos(tiny_engine_dir, gen):
    first = gen.start_answer(picture(), QUESTION, max_new_tokens=3)
    token = first.generate_next_token()
    first.cancel()
    assert first.cancelled and first.done and first.finish_reason is None
    with pytest.raises(Cancelled, match="this answer was cancelled"):
        first.result()
    with Generator.from_dir(tiny_engine_dir, verify=False) as g:
        g.folder.config = copy.deepcopy(g.folder.config)
        g.config["backbone"]["eos_token_id"] = token  # the first greedy token ends the answer
        job = g.start_answer(picture(), QUESTION, max_new_tokens=3)
        assert run_job(job) == [token]
        assert job.finish_reason == "eos" and job.tokens == [] and job.text() == ""


def test_finish_reason_cache_full_keeps_the_same_tokens(tiny_engine_dir):
    """With the decode capacity cut to the prompt + 3 rows, the job stops with `cache_full`
    after 4 tokens (the prefill's, then one per free row), equal to a long answer's first 4
    (eos is disabled so the tiny model's short answers do not end first)."""
    with Generator.from_dir(tiny_engine_dir, verify=False) as g:
        g.folder.config = copy.deepcopy(g.folder.config)
        g.config["backbone"]["eos_token_id"] = -1
        probe = g.start_answer(picture(), QUESTION, max_new_tokens=12)
        long_ids = run_job(probe)
        assert probe.finish_reason == "length" and len(long_ids) == 12
        rows = probe._position - 11  # the prompt's rows
        manifest = copy.deepcopy(g.manifest)
        for d in manifest["graphs"]["decode"]["spec"]["dims"]:
            if d["name"] == "capacity":
                d["max"] = d["opt"] = rows + 3
        config = g.config
        g.folder = EngineFolder(g.folder.path, manifest)
        g.folder.config = config
        job = g.start_answer(picture(), QUESTION, max_new_tokens=12)
        assert run_job(job) == long_ids[:4]
        assert job.finish_reason == "cache_full" and job.capacity == 0  # cache freed at the end


def test_cache_is_sized_for_the_job_not_the_graph_max(gen):
    job = gen.start_answer(picture(), QUESTION, max_new_tokens=5)
    job.generate_next_token()
    if not job.done:
        assert job.capacity == job._position + 5 - 1
        assert job._cache.keys.shape[3] == job.capacity
    job.cancel()


@pytest.mark.parametrize("low_memory", [False, True])
def test_interleaved_token_and_generation_jobs_equal_jobs_run_alone(tiny_engine_dir, low_memory):
    images = [picture(), picture((220, 40, 40), 80), picture((30, 160, 60), 48)]
    questions = [QUESTION, "How many squares are there?", "What colour is it?"]
    with Generator.from_dir(tiny_engine_dir, verify=False) as g:
        alone = [g.answer(i, q, max_new_tokens=6) for i, q in zip(images, questions)]
        image_alone = np.asarray(g.generate("a red circle", steps=2, decoder_steps=2)[0])
    with Generator.from_dir(tiny_engine_dir, verify=False, low_memory=low_memory) as g:
        jobs = [g.start_answer(i, q, max_new_tokens=6) for i, q in zip(images, questions)]
        drawing = g.start("a red circle", steps=2, decoder_steps=2)
        while not all(j.done for j in jobs) or not drawing.done:
            for j in jobs:
                if not j.done:
                    j.generate_next_token()
            if not drawing.done:
                drawing.step()
        assert [j.text() for j in jobs] == alone
        assert np.array_equal(np.asarray(drawing.result()[0]), image_alone)
        if low_memory:
            assert g._sessions == {}  # the last job to finish closed what others kept open


def test_seeded_sampling_is_reproducible_and_top_p_narrows_to_greedy(gen):
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
    a = gen.answer(picture(), QUESTION, seed=1, **kw)
    assert gen.answer(picture(), QUESTION, seed=1, **kw) == a
    others = {gen.answer(picture(), QUESTION, seed=s, **kw) for s in range(2, 6)}
    assert others != {a}  # a sampler that ignored the seed would give one text
    greedy = gen.answer(picture(), QUESTION, max_new_tokens=8)
    narrow = gen.answer(picture(), QUESTION, max_new_tokens=8, temperature=1.5, top_p=1e-9)
    assert narrow == greedy


def test_sample_token_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = [sample_token(logits, AnswerParams(temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top = [sample_token(logits, AnswerParams(temperature=1.0, top_p=0.7), rng) for _ in range(2000)]
    assert set(top) == {0, 1}  # the nucleus: 0.5 + 0.3 >= 0.7
    assert sample_token(logits, AnswerParams(), rng) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), r"temperature must be .* got -1\.0"),
        (dict(top_p=1.5), r"top_p must be .* got 1\.5"),
        (dict(seed=-3), r"seed must be in"),
        (dict(max_new_tokens=0), r"max_new_tokens must be in"),
    ],
)
def test_bad_sampling_options_are_one_line_errors(gen, kwargs, match):
    with pytest.raises(UserError, match=match):
        gen.start_answer(picture(), QUESTION, **kwargs)


def test_decode_outputs_do_not_grow_with_the_cache(gen):
    """The decode graph returns one K/V row at any cache capacity (outputs O(1) in the past)."""
    decode = gen.session("decode")
    spec = decode.spec
    l = gen.config["backbone"]["num_layers"]
    _, kv, _, d = spec.tensor("cache_keys.0").shape  # (B, KV, C, D) per layer
    h = gen.folder.embeddings.shape[1]
    shapes = set()
    for capacity in (4, 300):
        cache = np.zeros((l, 1, kv, capacity, d), np.float32)
        out = decode.run(
            {
                "inputs_embeds": np.zeros((1, 1, h), np.float32),
                "position_ids": np.full((3, 1, 1), 2, np.int64),
                "cache_position": np.array([2], np.int64),
                **cache_feeds(cache, cache),
            }
        )
        shapes.add((out["new_keys"].shape, out["new_values"].shape, out["logits"].shape))
    assert len(shapes) == 1 and next(iter(shapes))[0] == (l, 1, kv, 1, d)
