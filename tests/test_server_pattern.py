"""The Channels pattern matcher: gobwas/glob's syntax, and linear time whatever the pattern.

The property test draws patterns as terms, writes them out in glob syntax, and checks the matcher
(which reads the text) against a reference that walks the terms with sets of positions (a DP that
needs no automaton). Each case has a time bound (hypothesis `deadline`).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.server.pattern import (
    MAX_PATTERN_CHARS,
    Matcher,
    PatternError,
    PatternTooCostly,
    channel_matcher,
)

ALPHABET = "ab:*"

# Terms as the reference sees them: ("lit", c), ("one",), ("star",), ("class", chars, negate),
# ("range", lo, hi, negate), ("alt", [terms, ...]).
literal = st.sampled_from(ALPHABET).map(lambda c: ("lit", c))
simple = st.one_of(
    literal, literal, literal,
    st.just(("one",)), st.just(("star",)),
    st.tuples(st.just("class"), st.sets(st.sampled_from("ab:"), min_size=1).map("".join), st.booleans()),
    st.tuples(st.just("range"), st.just("a"), st.sampled_from("ab"), st.booleans()),
)
terms_strategy = st.recursive(
    st.lists(simple, max_size=8),
    lambda inner: st.lists(st.one_of(simple, st.lists(inner, min_size=1, max_size=3).map(lambda o: ("alt", o))),
                           max_size=6),
    max_leaves=20,
)


def render(terms: list[object]) -> str:
    out = []
    for term in terms:
        kind = term[0]  # type: ignore[index]
        if kind == "lit":
            char = term[1]  # type: ignore[index]
            out.append("\\" + char if char in "*?[{}],\\" else char)
        elif kind == "one":
            out.append("?")
        elif kind == "star":
            out.append("*")
        elif kind == "class":
            _, chars, negate = term  # type: ignore[misc]
            out.append(f"[{'!' if negate else ''}{chars}]")
        elif kind == "range":
            _, low, high, negate = term  # type: ignore[misc]
            out.append(f"[{'!' if negate else ''}{low}-{high}]")
        else:
            out.append("{" + ",".join(render(option) for option in term[1]) + "}")  # type: ignore[index]
    return "".join(out)


def ends(terms: list[object], text: str, starts: set[int]) -> set[int]:
    """Positions of `text` where `terms` can end, having started at any of `starts`."""
    size = len(text)
    for term in terms:
        kind = term[0]  # type: ignore[index]
        if kind == "lit":
            starts = {i + 1 for i in starts if i < size and text[i] == term[1]}  # type: ignore[index]
        elif kind == "one":
            starts = {i + 1 for i in starts if i < size}
        elif kind == "star":
            starts = set(range(min(starts), size + 1)) if starts else set()
        elif kind == "class":
            _, chars, negate = term  # type: ignore[misc]
            starts = {i + 1 for i in starts if i < size and (text[i] in chars) != negate}
        elif kind == "range":
            _, low, high, negate = term  # type: ignore[misc]
            starts = {i + 1 for i in starts if i < size and (low <= text[i] <= high) != negate}
        else:
            starts = set().union(*(ends(option, text, starts) for option in term[1]))  # type: ignore[index]
    return starts


def reference(terms: list[object], text: str) -> bool:
    return len(text) in ends(terms, text, {0})


@settings(max_examples=400, deadline=timedelta(milliseconds=500))
@given(terms=terms_strategy, texts=st.lists(st.text(ALPHABET, max_size=40), min_size=1, max_size=8))
def test_matcher_agrees_with_a_reference(terms: list[object], texts: list[str]) -> None:
    pattern = render(terms)
    matcher = channel_matcher(pattern)
    for text in texts:
        expected = reference(terms, text) if pattern else True  # an empty pattern lists everything
        assert matcher(text) == expected, (pattern, text)


@settings(max_examples=100, deadline=timedelta(milliseconds=500))
@given(stars=st.integers(1, 30), length=st.integers(0, 255), last=st.sampled_from("ab"))
def test_stars_and_letters_take_linear_time(stars: int, length: int, last: str) -> None:
    """The shape that made the old regex translation backtrack for minutes."""
    pattern = "*a" * stars + "*b"
    channel = "a" * length + last
    expected = last == "b" and length >= stars
    assert Matcher(pattern)(channel) is expected


@pytest.mark.timeout(10)  # the old matcher took over 30 s on ONE such channel
def test_the_reported_pattern_answers_at_once_on_10000_long_channels() -> None:
    matcher = Matcher("*a*a*a*a*a*a*b")
    channels = ["a" * 200] * 10_000 + ["a" * 199 + "b"]
    assert [c for c in channels if matcher(c)] == ["a" * 199 + "b"]


@pytest.mark.parametrize("pattern, channel, expected", [
    ("chat:*", "chat:x", True), ("chat:*", "chat", False), ("chat:**", "chat:a:b", True),
    ("a?c", "abc", True), ("a?c", "ac", False), ("[a-c]x", "bx", True), ("[!a-c]x", "bx", False),
    ("[!a-c]x", "dx", True), ("[ab-]", "-", True), ("{a,bb}c", "bbc", True), ("{a,bb}c", "bc", False),
    ("{a,b{c,d}}", "bd", True), ("a}", "a}", True), ("a,b", "a,b", True), ("a]", "a]", True),
    ("\\*", "*", True), ("\\*", "a", False), ("{a", "a", True), ("x{a,", "x", True), ("x{,a}", "x", True),
    ("[\\]]", "]", True), ("é?", "é漢", True), ("", "anything", True), ("a\\", "a", True),
])
def test_gobwas_syntax(pattern: str, channel: str, expected: bool) -> None:
    assert channel_matcher(pattern)(channel) is expected


@pytest.mark.parametrize("pattern", ["[", "[]", "[!]", "[a-zA-Z]", "[a-]", "[z-a]", "[a-", "x[ab"])
def test_patterns_gobwas_refuses_are_errors(pattern: str) -> None:
    with pytest.raises(PatternError):
        channel_matcher(pattern)


@pytest.mark.timeout(20)
def test_a_pattern_whose_dfa_would_explode_is_refused_within_its_budget() -> None:
    """`*a` then 25 `?`: a DFA of 2**25 states. The matcher stops at its budget instead."""
    matcher = Matcher("*a" + "?" * 25)
    channels = [format(n * 2654435761 % 2**40, "040b").replace("0", "a").replace("1", "b") for n in range(5000)]
    matched = 0
    with pytest.raises(PatternTooCostly):
        for channel in channels:
            matched += matcher(channel)
    assert 0 < matched < len(channels)  # it did match some before it stopped


@pytest.mark.parametrize("pattern", ["*" * (MAX_PATTERN_CHARS + 1), "{" * 4000, "{a," * 1000 + "}" * 1000])
def test_a_pattern_too_long_or_too_deep_is_refused(pattern: str) -> None:
    with pytest.raises(PatternTooCostly):
        channel_matcher(pattern)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", [
    "*?" * 2000, "*{a,b,ab}?" * 400, ("{a,*}" * 800)[:4096], "[!a]*" * 800, "*a" + "?" * 200,
])
def test_patterns_made_to_be_slow_finish_or_are_refused(pattern: str) -> None:
    """Long patterns of stars, alternatives and `?` over 3,000 random 255-character names."""
    matcher = channel_matcher(pattern, budget=20_000_000)
    names = [format(n * 0x9E3779B97F4A7C15 % 2**255, "0255b").replace("0", "a").replace("1", "b")
             for n in range(3000)]
    try:
        for name in names:
            matcher(name)
    except PatternTooCostly:
        pass
