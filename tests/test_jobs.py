"""The jobs and `step_jobs` over scripted sessions (tests/fake_sessions.py): control flow, the one
job vocabulary, cancellation, failures and batching, without exporting anything."""

import numpy as np
import pytest

from runtime.errors import Cancelled, ResultError
from runtime.folder.engine_folder import EngineFolder
from runtime.generator import Generator
from runtime.jobs.generation import step_jobs
from tests.fake_sessions import Script, ScriptedGraphs, fake_folder
from tests.simulated_device import picture

FAST = dict(steps=3, decoder_steps=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fake_folder(tmp_path_factory.mktemp("fake") / "tiny-fake")


def generator(folder, script=None, **kwargs):
    graphs = ScriptedGraphs(script)
    gen = Generator(EngineFolder(folder), open_graph=graphs, **kwargs)
    return gen, graphs


def test_the_fake_folder_is_a_valid_engine_folder(folder):
    """The scripted tier stands on a folder the real reader accepts, files verified."""
    with Generator.from_dir(folder, verify="full", open_graph=ScriptedGraphs()) as gen:
        assert gen.folder.variant == "tiny" and gen.folder.batch_range() == (1, 4)


def test_a_generation_runs_its_stages_in_order(folder):
    gen, graphs = generator(folder)
    job = gen.start("a red circle", **FAST)
    stages = []
    while not job.done:
        stages.append(job.step())
    assert stages == ["prefill", "dit", "dit", "dit", "unet", "unet", "vae_decoder"]
    assert graphs.log == ["prefill", "dit_step", "dit_step", "dit_step", "unet_step",
                          "unet_step", "vae_decoder"]  # fmt: skip
    assert job.done_steps == job.total == 7 and job.stage == "done"
    assert not job.cancelled and job.error is None
    images = job.result()
    assert len(images) == 1 and images[0].size == (64, 64)
    assert job.features.shape == (1, 64, 32)  # (N, 64, C) kept for callers
    with pytest.raises(RuntimeError, match="this generation is finished; call result"):
        job.step()


def test_the_step_graphs_get_the_sampler_plans_scalars(folder):
    from runtime.jobs.samplers import flow_plan

    gen, graphs = generator(folder)
    gen.generate("a red circle", **FAST, sampler="lms", guidance=2.5)
    plan = flow_plan("lms", 3)
    calls = graphs.calls("dit_step")
    assert [float(c["c_velocity"][0]) for c in calls] == pytest.approx(
        [call.c_velocity for call in plan.calls]
    )
    assert all(float(c["guidance"][0]) == 2.5 for c in calls)
    prefill = graphs.calls("prefill")[0]
    assert prefill["inputs_embeds"].shape[1] > 64  # the prompt, then the 64 latent queries


def test_cancel_means_done_and_result_says_cancelled(folder):
    gen, graphs = generator(folder)
    job = gen.start("a red circle", **FAST)
    job.step()
    job.cancel()
    assert job.done and job.cancelled and job.latents is None  # holds nothing
    with pytest.raises(Cancelled, match="this generation was cancelled"):
        job.result()
    with pytest.raises(Cancelled):
        job.step()
    job.cancel()  # again: nothing changes
    # the README's loop ends after a cancel instead of raising
    other = gen.start("a blue square", **FAST)
    while not other.done:
        other.step()
        other.cancel()
    assert other.cancelled and graphs.log.count("prefill") == 2


def test_a_job_opens_at_its_first_step_and_closes_when_done(folder):
    gen, _ = generator(folder)
    opened, closed = [], []
    gen.open_job, gen.close_job = opened.append, closed.append
    job = gen.start("a red circle", **FAST)
    assert opened == []  # making a job touches nothing shared
    job.step()
    assert opened == [job] and closed == []
    job.result()
    assert closed == [job]
    never = gen.start("a red circle", **FAST)
    never.cancel()  # never opened: nothing to close
    assert closed == [job]


def test_a_nan_output_fails_its_job_in_one_line(folder):
    gen, _ = generator(folder, Script(nan_at=("dit_step", 2)))
    job = gen.start("a red circle", **FAST)
    with pytest.raises(ResultError, match="the DiT's image features"):
        while not job.done:
            job.step()
    assert job.done and job.error is not None and not job.cancelled
    with pytest.raises(ResultError):
        job.result()
    with pytest.raises(RuntimeError, match="this generation failed"):
        job.step()


def test_a_session_that_raises_fails_every_job_of_its_call(folder):
    gen, _ = generator(folder, Script(raise_at=("dit_step", 0)))
    a, b = gen.start("a red circle", **FAST), gen.start("a blue square", **FAST)
    with gen.lock:
        step_jobs(gen, [a])
        step_jobs(gen, [b])
        with pytest.raises(RuntimeError, match="scripted failure"):
            step_jobs(gen, [a, b])
    assert a.done and b.done and a.error is b.error


def test_batched_jobs_compute_what_they_compute_alone(folder):
    gen, graphs = generator(folder)
    alone = [
        gen.generate("a red circle", **FAST, seed=1),
        gen.generate("two blue squares", **FAST, seed=2, num_images=2),
    ]
    jobs = [
        gen.start("a red circle", **FAST, seed=1),
        gen.start("two blue squares", **FAST, seed=2, num_images=2),
    ]
    with gen.lock:
        for job in jobs:
            step_jobs(gen, [job])  # prefills are not batched
        batch_sizes = []
        while not jobs[0].done:
            assert jobs[0].key() == jobs[1].key()
            graphs.log.clear()
            step_jobs(gen, jobs)
            batch_sizes.append(len(graphs.calls(graphs.log[-1])[-1]["latents"]))
    assert set(batch_sizes) == {3}  # one row, then two: one call each step
    a, b = jobs[0].result(), jobs[1].result()
    assert np.array_equal(np.asarray(a[0]), np.asarray(alone[0][0]))
    assert len(b) == 2
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(b, alone[1]))


def test_jobs_at_different_calls_cannot_share_one(folder):
    gen, _ = generator(folder)
    a, b = gen.start("a red circle", **FAST), gen.start("a red circle", **FAST, guidance=1.0)
    with gen.lock:
        step_jobs(gen, [a])
        step_jobs(gen, [b])
        with pytest.raises(ValueError, match="cannot share a call"):
            step_jobs(gen, [a, b])


def test_low_memory_closes_each_stage_unless_another_job_is_in_it(folder):
    gen, graphs = generator(folder, low_memory=True)
    gen.generate("a red circle", **FAST)
    assert graphs.closed == ["prefill", "dit_step", "unet_step", "vae_decoder"]
    graphs.closed.clear()
    a, b = gen.start("a red circle", **FAST), gen.start("a blue square", **FAST)
    a.step()
    b.step()
    a.result()
    assert "dit_step" not in graphs.closed[:1]  # b still open: its stage stayed
    b.result()
    assert set(graphs.closed) >= {"dit_step", "unet_step", "vae_decoder"}


def test_blank_prompt_features_run_the_dit_stage_only(folder):
    from runtime.jobs.generation import blank_prompt_features

    gen, graphs = generator(folder)
    features = blank_prompt_features(gen)
    assert features.shape == (1, 64, 32)
    assert "unet_step" not in graphs.log and graphs.log.count("dit_step") == 30


# ---- the answer job -------------------------------------------------------------------------


def test_an_answer_steps_one_token_per_call_and_ends_at_eos(folder):
    gen, graphs = generator(folder, Script(answer=[11, 12, 13], eos=2))
    job = gen.start_answer(picture(), "Describe the image.", max_new_tokens=10)
    tokens = []
    while not job.done:
        tokens.append(job.step())
    assert tokens == [11, 12, 13, 2] and job.tokens == [11, 12, 13]
    assert job.finish_reason == "eos" and job.result() == job.text()
    assert graphs.log == ["vision", "prefill", "decode", "decode", "decode"]
    # each decode read the cache rows written so far, in place: prefill's then one per token
    prompt = job.prompt_tokens
    for i, rows in enumerate(graphs.caches):
        assert rows.tolist() == list(range(prompt + i))


def test_an_answer_stops_at_its_length_and_the_old_names_still_work(folder):
    gen, _ = generator(folder, Script(answer=list(range(20, 40)), eos=None))
    job = gen.start_answer(picture(), "Describe the image.", max_new_tokens=4)
    while not job.is_done():
        job.generate_next_token()
    assert job.finish_reason == "length" and len(job.tokens) == 4


def test_a_cancelled_answer_is_done_and_frees_its_cache(folder):
    gen, _ = generator(folder)
    job = gen.start_answer(picture(), "Describe the image.", max_new_tokens=8)
    job.step()
    assert job.capacity > 0
    job.cancel()
    assert job.done and job.cancelled and job.capacity == 0 and job.finish_reason is None
    with pytest.raises(Cancelled, match="this answer was cancelled"):
        job.result()


def test_answer_params_are_one_value(folder):
    from runtime.params import AnswerParams

    gen, _ = generator(folder, Script(answer=list(range(20, 40)), eos=None))
    params = AnswerParams(max_new_tokens=3)
    assert gen.start_answer(picture(), "q", params).params == params
    assert gen.start_answer(picture(), "q", max_new_tokens=3).params == params
    assert gen.answer(picture(), "q", params) == gen.answer(picture(), "q", max_new_tokens=3)
    with pytest.raises(ValueError, match="unknown AnswerParams setting"):
        gen.start_answer(picture(), "q", max_tokens=3)


def test_words_outside_the_models_vocabulary_are_named_in_a_warning(tmp_path, caplog):
    from training.data.shapes import vocabulary

    def with_vocabulary(manifest):
        manifest["template"]["vocabulary"] = vocabulary()

    folder = fake_folder(tmp_path / "vocab", edit=with_vocabulary)
    gen, _ = generator(folder)
    with caplog.at_level("WARNING", logger="runtime.generator"):
        gen.start("a pink elephant left of a red circle", **FAST)
        gen.start("Two blue squares.", **FAST)  # case and punctuation are not words
    (record,) = caplog.records
    assert record.getMessage().startswith("'pink', 'elephant' not in this model's vocabulary")
    assert gen.prompts.unknown_words("three red triangles above a circle") == []
