from schemas import subjects


def test_model_ids_with_dots_become_one_reversible_subject_token() -> None:
    tok = subjects.token("qwen2.5-7b")
    assert "." not in tok and tok == "qwen2_2e5-7b"
    assert subjects.untoken(tok) == "qwen2.5-7b"
    assert subjects.untoken(subjects.token("a_b.c/d*é")) == "a_b.c/d*é"


def test_priority_maps_to_tiers_highest_first() -> None:
    assert [subjects.tier_of(p) for p in (5, 0, -3)] == ["high", "normal", "low"]
    assert subjects.TIERS[0] == "high"


def test_every_request_subject_falls_under_the_stream_subjects() -> None:
    assert subjects.generate_subject("m.1", "high").startswith(subjects.GENERATE_SUBJECTS[:-1])
    assert subjects.hinted_subject("m", "w.1").startswith(subjects.GENERATE_SUBJECTS[:-1])


def test_trace_ids_that_could_escape_their_subject_are_rejected() -> None:
    assert subjects.is_valid_trace_id("gen-abc_123")
    for bad in ("", "a.b.c", ".b", "a.", "a_x.b", "a*", "a>", "a b", "x" * 200):
        assert not subjects.is_valid_trace_id(bad)


def test_a_publishers_trace_ids_live_under_its_own_reply_and_cancel_subjects() -> None:
    trace_id = subjects.owned_trace_id("alice", "t1")
    assert subjects.is_valid_trace_id(trace_id)
    assert subjects.stream_subject(trace_id).startswith(subjects.owned_streams("alice")[:-1])
    assert subjects.cancel_subject(trace_id).startswith(subjects.owned_cancels("alice")[:-1])
    assert subjects.trace_of_cancel(subjects.cancel_subject(trace_id)) == trace_id
    # A single-token (gateway) trace id is one token short of any publisher's `<name>.>` permission.
    assert subjects.stream_subject("alice").count(".") == subjects.owned_streams("alice").count(".") - 1
