"""One request's books in the coordinator: stop strings across token boundaries, eos, max_tokens,
and the streamed deltas adding up to the final text without ever showing a stop string."""
from __future__ import annotations

import pytest

from gdsllm.engine.sequence import Sequence, validate_request
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


def make(tokens, **kw) -> tuple[Sequence, list[str]]:
    req = Generate(request_id="r", prompt="x", **kw)
    seq = Sequence(1, b"c", req, [1], FakeTokenizer(), frozenset({EOS}), max_new=req.max_tokens)
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
    seq, deltas = make([1, 2, 3], stop=["xyz!"], max_tokens=3)
    assert deltas[0] == "" and "".join(deltas) == "Hello wor" == seq.text  # all released at the end
    final = seq.final()
    assert final.finish_reason == "length" and final.completion_tokens == 3 and final.prompt_tokens == 1


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=1.5), dict(top_k=-1),
                                dict(max_tokens=0), dict(seed=-1), dict(stop=[""]),
                                dict(stop=["x"] * 17), dict(temperature=float("inf"))])
def test_bad_sampling_values(kw):
    with pytest.raises(ValueError, match="request r"):
        validate_request(Generate(request_id="r", prompt="x", **kw))


def test_bad_chat_messages():
    with pytest.raises(ValueError, match="role"):
        validate_request(Generate(request_id="r", messages=[ChatMessage("robot", "hi")]))
    with pytest.raises(ValueError, match="empty"):
        validate_request(Generate(request_id="r", messages=[]))
