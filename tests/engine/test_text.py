from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.stops import StopMatcher
from tests.helpers import real_model_dir


def test_incremental_detokenizing_equals_decoding_everything_at_once() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model_dir())
    text = "Hello, 世界! Ünïcödé and emoji 🤖 in one line.\nSecond line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    matcher = StopMatcher(["###", "END"])
    out, hit = matcher.feed("Hello #")
    assert (out, hit) == ("Hello ", False)
    out2, hit2 = matcher.feed("# x")
    assert (out2, hit2) == ("## x", False)
    out3, hit3 = matcher.feed("yz EN")
    assert (out3, hit3) == ("yz ", False)
    out4, hit4 = matcher.feed("D tail")
    assert (out4, hit4) == ("", True)


def test_held_back_text_is_released_when_the_stream_ends() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.flush() == "ST"
