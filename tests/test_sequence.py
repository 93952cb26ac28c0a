"""One request's books, the same in the coordinator and gdsllm.LLM: stop strings across token
boundaries, eos, stop token ids, max_tokens and the context, the streamed deltas adding up to the
final text without ever showing a stop string, and the request checks both engines apply."""
from __future__ import annotations

import pytest

from gdsllm.engine.sampling import SamplingParams
from gdsllm.engine.sequence import Generation, prompt_ids
from gdsllm.service.requests import Sequence, validate_request
from gdsllm.format.metadata import LlamaParams
from ipc.messages import ChatMessage, Generate

VOCAB = ["", "Hel", "lo", " wor", "ld", "!", " S", "TOP", " more", "<eos>"]
EOS = 9


class FakeTokenizer:
    """Each id is a fixed piece of text (enough for the books; the real one is tested elsewhere)."""

    def detokenizer(self, prompt_ids):
        return self

    def push(self, t: int) -> str:
        return VOCAB[t]

    def flush(self) -> str:
        return ""  # every piece is whole text: nothing is ever held back


def make(tokens, max_context=1000, **kw) -> tuple[Sequence, list[str]]:
    req = Generate(request_id="r", prompt="x", **kw)
    seq = Sequence(1, b"c", req, [1], FakeTokenizer(), frozenset({EOS}), max_context)
    deltas = []
    for t in tokens:
        deltas.append(seq.append(t))
        if seq.finish_reason:
            break
    return seq, deltas


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    seq, deltas = make([1, 2, 3, 4, 6, 7, 8], stop=["ld S"], max_tokens=50)
    assert seq.finish_reason == "stop" and seq.text == "Hello wor"
    assert "".join(deltas) == seq.text and len(seq.token_ids) == 5


def test_eos_length_and_ignore_eos():
    seq, deltas = make([1, 2, EOS, 3], max_tokens=50)
    assert (seq.finish_reason, seq.text, seq.token_ids) == ("stop", "Hello", [1, 2, EOS])
    seq, _ = make([1, 2, EOS, 3], max_tokens=50, ignore_eos=True)
    assert seq.finish_reason is None and seq.text == "Hello<eos> wor"
    seq, deltas = make([1, 2, 3, 4, 5], max_tokens=3)
    assert (seq.finish_reason, seq.text) == ("length", "Hello wor") and "".join(deltas) == seq.text


def test_holdback_only_while_a_stop_string_could_follow():
    # "Hel" cannot start "xyz!": streamed at once
    seq, deltas = make([1, 2, 3], stop=["xyz!"], max_tokens=3)
    assert deltas == ["Hel", "lo", " wor"] and seq.text == "Hello wor"
    final = seq.final()
    assert final.finish_reason == "length" and final.completion_tokens == 3 and final.prompt_tokens == 1
    # a tail that starts a stop string waits: "l" and "lo" (of "lo!"), then "wor", "world" (of
    # "world!"), released once it cannot be one any more, or at the end
    seq, deltas = make([1, 2, 3, 4, 6], stop=["lo!", "world!"], max_tokens=5)
    assert deltas == ["He", "l", "lo ", "", "world S"] and "".join(deltas) == seq.text == "Hello world S"


def test_stop_token_ids_and_context_limit():
    seq, deltas = make([1, 2, 7, 3], stop_token_ids=[7], max_tokens=50)
    assert (seq.finish_reason, seq.token_ids, seq.text) == ("stop", [1, 2, 7], "Hello")
    assert "".join(deltas) == "Hello"
    # a stop id ends it even with ignore_eos (that only concerns the model's end-of-sequence ids)
    seq, _ = make([1, EOS, 7, 3], stop_token_ids=[7], ignore_eos=True, max_tokens=50)
    assert seq.finish_reason == "stop" and seq.token_ids == [1, EOS, 7]
    # the context: a 1-token prompt in a context of 4 leaves room for 3 new tokens
    seq, _ = make([1, 2, 3, 4, 5], max_context=4, max_tokens=50)
    assert (seq.finish_reason, seq.token_ids) == ("length", [1, 2, 3])


def test_generation_without_a_tokenizer_counts_tokens_only():
    gen = Generation([5, 6], SamplingParams(max_tokens=3, stop_token_ids=(9,)), {2}, 100)
    assert [gen.append(t) for t in (4, 4)] == ["", ""] and gen.finish_reason is None
    assert gen.append(9) == "" and gen.finish_reason == "stop" and gen.token_ids == [4, 4, 9]


P = LlamaParams(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
                rope_theta=1e4, max_position_embeddings=4, tie_word_embeddings=False)


@pytest.mark.parametrize("prompt, msg", [
    ("", "empty prompt"), ([], "empty prompt"), ([1, 2, 10], "outside the vocabulary"),
    ([1, 2, 3, 4], "prompt of 4 tokens does not fit the model's context of 4"),
    ([1.5], "a prompt is a string"), ("hi", "no tokenizer"),
    ([{"role": "wizard", "content": "x"}], "needs a role")])
def test_prompt_checks(prompt, msg):
    with pytest.raises(ValueError, match=f"where: .*{msg}"):
        prompt_ids(prompt, None, P, "where")
    assert prompt_ids([1, 2, 3], None, P, "where") == [1, 2, 3]


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=1.5), dict(top_k=-1),
                                dict(max_tokens=0), dict(seed=-1), dict(stop=[""]),
                                dict(stop=["x"] * 17), dict(temperature=float("inf")),
                                dict(stop_token_ids=[-1]), dict(stop_token_ids=list(range(65)))])
def test_bad_sampling_values(kw):
    with pytest.raises(ValueError, match="request r"):
        validate_request(Generate(request_id="r", prompt="x", **kw))


def test_bad_chat_messages():
    with pytest.raises(ValueError, match="request r: .*role"):
        validate_request(Generate(request_id="r", messages=[ChatMessage("robot", "hi")]))
    with pytest.raises(ValueError, match="empty"):
        validate_request(Generate(request_id="r", messages=[]))
