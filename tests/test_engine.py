"""The engine (llmlb_node.engine) with the real llama.cpp and the real Gemma 3 270M: sequences
batched in one decode per step, chunked prompts, cancellation, prefix reuse, n > 1, logprobs,
grammars. Proofs come from the engine's own step counters, never from timing.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections.abc import Callable, Iterator

import llama_cpp
import pytest

from llmlb_node import LazyLlama, ModelResolver, Settings
from llmlb_node.engine import REQUIRED, Engine, Generation, Output, SamplingParams
from llmlb_node.errors import PromptTooLongError

MODEL = "gemma-3-270m"
GREEDY = SamplingParams(temperature=0)
NO_EOS = {1: -100.0, 106: -100.0}  # <eos>, <end_of_turn>: streams run their full length


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[llama_cpp.Llama]:
    home = tmp_path_factory.mktemp("engine-store")
    settings = Settings.from_env(env={"LLMLB_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    with ModelResolver(settings) as resolver:
        llm = LazyLlama(MODEL, resolver=resolver, n_ctx=256, verbose=False)
        yield llm.load()
        llm.close()


@pytest.fixture
def engine(llama: llama_cpp.Llama) -> Iterator[Engine]:
    engine = Engine(llama, parallel=4, n_ctx=256)
    yield engine
    engine.close()


def tokens(llama: llama_cpp.Llama, text: str) -> list[int]:
    return llama.tokenize(text.encode())


def texts(generation: Generation) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in generation:
        out[item.index] = out.get(item.index, "") + item.text
    return out


def until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Wait for the engine thread to get there (it retires a sequence after emitting its end)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_every_binding_the_engine_uses_exists_in_the_installed_llama_cpp() -> None:
    missing = [name for name in REQUIRED if not hasattr(llama_cpp, name)]
    assert missing == [], f"llama-cpp-python {llama_cpp.__version__} lacks {missing}"


def test_greedy_text_is_llama_cpp_pythons_own(llama: llama_cpp.Llama) -> None:
    prompt = tokens(llama, "Once upon a time")
    want = llama.create_completion(prompt=prompt, max_tokens=24, temperature=0)
    engine = Engine(llama, parallel=1, n_ctx=256)
    try:
        got = texts(engine.submit(prompt, GREEDY, max_tokens=24))[0]
    finally:
        engine.close()
    assert got == want["choices"][0]["text"]


def test_concurrent_streams_decode_in_one_batch(engine: Engine, llama: llama_cpp.Llama) -> None:
    bias = SamplingParams(temperature=0, logit_bias=NO_EOS)
    prompts = ["The sea", "A red fox", "In 1999", "My garden"]
    generations = [engine.submit(tokens(llama, p), bias, max_tokens=16) for p in prompts]
    for generation in generations:
        assert texts(generation)[0]
        assert generation.finish_reasons == {0: "length"}
        assert generation.completion_tokens == 16
    # One at a time would take 4 x 16 steps; batched, the four share (nearly) every step. (The
    # engine may take a step between two submit() calls, so the first steps can be ragged.)
    assert until(engine.scheduler.idle)
    stats = engine.stats
    assert stats.decoded_tokens == 4 * 15  # the 16th token of each is sampled, never fed back
    assert stats.sequences_per_step[4] >= 12
    assert stats.steps <= 16 + 4


def test_cancelling_frees_the_cell_for_the_next_request(llama: llama_cpp.Llama) -> None:
    engine = Engine(llama, parallel=1, n_ctx=256)
    try:
        long = engine.submit(tokens(llama, "Count:"), SamplingParams(logit_bias=NO_EOS))
        queued = engine.submit(tokens(llama, "Hello"), GREEDY, max_tokens=4)
        outputs = iter(long)
        next(outputs), next(outputs)
        assert not queued.done  # one sequence id: the second waits for the first
        long.cancel()
        rest = list(outputs)
        assert rest[-1].finish_reason == "cancelled"
        assert texts(queued)[0]
        assert queued.finish_reasons == {0: "length"}
        assert long.completion_tokens < 200
        assert until(lambda: engine.scheduler.idle() and len(engine.scheduler.free) == 1)
    finally:
        engine.close()


def test_a_long_prompt_joins_in_chunks_while_a_stream_runs(llama: llama_cpp.Llama) -> None:
    engine = Engine(llama, parallel=2, n_ctx=2304, prefill_chunk=64)
    try:
        running = engine.submit(
            tokens(llama, "Tell a story."), SamplingParams(logit_bias=NO_EOS), max_tokens=200
        )
        stream = iter(running)
        next(stream)
        long_prompt = tokens(llama, "word " * 2000)[:2000]
        joining = engine.submit(long_prompt, GREEDY, max_tokens=1)
        during = 0
        first: list[Output] = []
        waiter = threading.Thread(target=lambda: first.extend(joining))
        waiter.start()
        while waiter.is_alive() and not running.done:
            next(stream)
            during += 1
        waiter.join()
        running.cancel()
        list(stream)
    finally:
        engine.close()
    assert first and first[-1].finish_reason == "length"
    # 2,000 tokens in chunks of at most 64 beside the running stream: >= 31 steps, each of
    # which also gave the running stream a token.
    assert engine.stats.largest_prompt_chunk <= 64
    assert during >= 2000 // 64 - 1


@pytest.fixture
def passes(llama: llama_cpp.Llama) -> Iterator[list[int]]:
    """How many times llama.cpp computes the model's graph (one pass over the weights per
    micro-batch) in contexts made while this fixture is active: its eval callback sees the output
    tensor once per pass."""
    from llama_cpp import _ggml

    name = _ggml.libggml.ggml_get_name
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    count = [0]

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor: int, ask: bool, _: int) -> bool:
        if name(tensor) != b"result_output":
            return False
        count[0] += not ask
        return True

    llama.context_params.cb_eval = observe  # the engine's context copies these parameters
    try:
        yield count
    finally:  # a null callback again (assigning the old field back would keep this one)
        llama.context_params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback()


def test_every_step_is_one_pass_over_the_weights_in_whatever_order_requests_arrive(
    llama: llama_cpp.Llama, passes: list[int]
) -> None:
    engine = Engine(llama, parallel=4, n_ctx=256)
    bias = SamplingParams(temperature=0, logit_bias=NO_EOS)
    try:
        prompts = [tokens(llama, f"Chapter {i}. " + "The keeper climbed the stairs. " * 4)
                   for i in range(4)]  # fmt: skip
        for generation in [engine.submit(p, bias, max_tokens=2) for p in prompts]:
            texts(generation)
        assert until(engine.scheduler.idle)
        # Chapter 3 first: each prompt goes back to the sequence id whose cells hold it, so they
        # run in the order 3, 2, 1, 0. llama.cpp takes a batch of one KV stream per sequence in
        # micro-batches of consecutive ids: the engine must hand it the pieces sorted.
        steps, before = engine.stats.steps, passes[0]
        reused = engine.stats.reused_tokens
        later = [engine.submit(p, bias, max_tokens=16) for p in reversed(prompts)]
        assert [texts(g)[0] for g in later]
        assert until(engine.scheduler.idle)
        assert engine.stats.reused_tokens - reused == sum(len(p) - 1 for p in prompts)
        assert engine.stats.sequences_per_step[4] >= 12
        assert passes[0] - before == engine.stats.steps - steps
        # A prompt sharing only its first tokens with a free sequence takes the lowest id.
        short = engine.submit(tokens(llama, "Chapter"), GREEDY, max_tokens=1)
        texts(short)
        assert short.sequences[0].seq_id == 0
    finally:
        engine.close()


def test_a_prompt_longer_than_a_sequence_is_refused_before_it_queues(
    engine: Engine, llama: llama_cpp.Llama
) -> None:
    with pytest.raises(PromptTooLongError) as caught:
        engine.submit(tokens(llama, "word " * 300), GREEDY)
    assert caught.value.n_ctx == 256
    assert engine.scheduler.idle()


def test_a_follow_up_prompt_reuses_the_cached_prefix(
    engine: Engine, llama: llama_cpp.Llama
) -> None:
    first = tokens(llama, "User: name three colours.\nAssistant:")
    answer = engine.submit(first, GREEDY, max_tokens=8)
    texts(answer)
    assert until(engine.scheduler.idle)
    reused = engine.stats.reused_tokens
    follow_up = answer.sequences[0].tokens + tokens(llama, "\nUser: and three more?")[1:]
    texts(engine.submit(follow_up, GREEDY, max_tokens=4))
    # The first request's prompt and all but its last answer token were still in its cells.
    assert engine.stats.reused_tokens - reused == len(first) + 8 - 1


def test_n_choices_share_one_evaluated_prompt(engine: Engine, llama: llama_cpp.Llama) -> None:
    prompt = tokens(llama, "Name an animal:")
    before = engine.stats.prompt_tokens
    generation = engine.submit(
        prompt, SamplingParams(temperature=1.0, seed=7, logit_bias=NO_EOS), max_tokens=12, n=3
    )
    choices = texts(generation)
    assert sorted(choices) == [0, 1, 2]
    assert len(set(choices.values())) > 1  # each choice has its own seed
    assert until(engine.scheduler.idle)
    assert engine.stats.prompt_tokens - before == len(prompt)  # evaluated once, then copied
    assert generation.completion_tokens == 36


def test_logprobs_come_from_the_steps_logits(engine: Engine, llama: llama_cpp.Llama) -> None:
    generation = engine.submit(tokens(llama, "The capital of France is"), GREEDY, max_tokens=6,
                               logprobs=3)  # fmt: skip
    outputs = list(generation)
    for output in outputs:
        assert output.logprob is not None
        top = output.logprob.top
        assert len(top) == 3 and top[0][0] == output.token  # greedy: the chosen is the best
        assert output.logprob.logprob == pytest.approx(top[0][1])
        assert all(lp <= 0 for _, lp in top) and top == sorted(top, key=lambda t: -t[1])


def test_a_grammar_constrains_the_output(engine: Engine, llama: llama_cpp.Llama) -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["city", "year"],
    }
    params = SamplingParams(temperature=0, grammar=json_schema_to_gbnf(json.dumps(schema)))
    text = texts(engine.submit(tokens(llama, "A city and a year as JSON:"), params))[0]
    value = json.loads(text)
    assert set(value) == {"city", "year"} and isinstance(value["year"], int)


def test_a_grammar_llama_cpp_cannot_parse_is_refused(
    engine: Engine, llama: llama_cpp.Llama
) -> None:
    with pytest.raises(ValueError, match="grammar"):
        engine.submit(tokens(llama, "x"), SamplingParams(grammar="root ::= ("))


def test_stop_strings_end_the_text_before_them(engine: Engine, llama: llama_cpp.Llama) -> None:
    prompt = tokens(llama, "1, 2, 3, 4, 5,")
    plain = texts(engine.submit(prompt, GREEDY, max_tokens=12))[0]
    cut = plain.strip().split(" ")[1]  # the second number it writes
    generation = engine.submit(prompt, GREEDY, max_tokens=12, stop=[cut])
    text = texts(generation)[0]
    assert cut not in text and plain.startswith(text)
    assert generation.finish_reasons == {0: "stop"}
