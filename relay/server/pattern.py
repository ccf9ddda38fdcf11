"""Channel patterns of the Channels method: glob syntax as Centrifugo reads it (gobwas/glob).

`*` (or `**`) any run of characters, `?` one character, `[abc]` / `[a-z]` / `[!abc]` / `[!a-z]`
a class, `{a,b}` alternatives (nested, each a pattern; an unclosed `{` runs to the end), `\\`
escapes the next character. `}` and `,` outside braces and `]` outside a class are plain
characters. An empty pattern matches every channel. A pattern gobwas refuses (an unclosed or empty
class, `[a-zA-Z]`, a range backwards) raises PatternError; Centrifugo answers those with 100.

Matching never backtracks: the pattern becomes a small automaton (one state per character test,
plus splits for `*` and `{}`), run over a channel one character at a time; the sets of states met
are cached as the states of a DFA, built lazily. So a channel costs one dictionary step per
character once the DFA is warm, and building it is bounded: a pattern whose DFA would outgrow
MAX_DFA_STATES or MAX_BUILD_VISITS, or whose work outgrows a Matcher's `budget`, raises
PatternTooCostly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A longer pattern is refused before it is read: no channel a client can name needs more.
MAX_PATTERN_CHARS = 4096
# Braces nested deeper are refused (reading and building recurse once per level).
MAX_NESTING = 32
# Distinct sets of automaton states kept per pattern (each costs a dict and a frozenset).
MAX_DFA_STATES = 10_000
# Work a Matcher may do when its caller sets no budget of its own: about a second.
DEFAULT_BUDGET = 20_000_000
# Automaton state visits building one DFA may take: this also bounds the memory the DFA's state
# sets hold (a few tens of MB at most); steps already cached cost nothing.
MAX_BUILD_VISITS = 1_000_000

_ANY = None  # the test of `?` and of the loop of `*`


class PatternError(ValueError):
    """A pattern Centrifugo's glob library would not compile."""


class PatternTooCostly(ValueError):
    """A pattern whose matching would cost more than the server lets one call spend."""


@dataclass(frozen=True, slots=True)
class CharClass:
    """`[...]`: a set of characters, or one range, maybe negated."""

    chars: frozenset[str] = frozenset()
    low: str = ""
    high: str = ""
    negate: bool = False

    def __contains__(self, char: object) -> bool:
        inside = char in self.chars or (bool(self.low) and self.low <= str(char) <= self.high)
        return inside != self.negate


# A term of a pattern: a literal character, `?` (None), a class, STAR, or alternatives.
STAR = object()


@dataclass(frozen=True, slots=True)
class Alternatives:
    options: tuple[tuple[object, ...], ...]


# -- reading ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Reader:
    text: str
    pos: int = 0
    depth: int = 0

    def sequence(self) -> tuple[object, ...]:
        """Terms up to the end, or (inside braces) up to `,` or `}` (left unread)."""
        terms: list[object] = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if self.depth and char in ",}":
                break
            self.pos += 1
            if char == "*":
                if self.pos < len(text) and text[self.pos] == "*":
                    self.pos += 1
                if not terms or terms[-1] is not STAR:
                    terms.append(STAR)
            elif char == "?":
                terms.append(_ANY)
            elif char == "[":
                terms.append(self.char_class())
            elif char == "{":
                terms.append(self.alternatives())
            elif char == "\\":
                if self.pos < len(text):  # a trailing backslash escapes nothing, as in gobwas
                    terms.append(text[self.pos])
                    self.pos += 1
            else:
                terms.append(char)
        return tuple(terms)

    def alternatives(self) -> Alternatives:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise PatternTooCostly(f"braces nested more than {MAX_NESTING} deep")
        options = [self.sequence()]
        while self.pos < len(self.text) and self.text[self.pos] == ",":
            self.pos += 1
            options.append(self.sequence())
        if self.pos < len(self.text):  # the closing `}`; an unclosed `{` runs to the end
            self.pos += 1
        self.depth -= 1
        return Alternatives(tuple(options))

    def char_class(self) -> CharClass:
        text = self.text
        negate = self.pos < len(text) and text[self.pos] == "!"
        if negate:
            self.pos += 1
        if self.pos + 1 < len(text) and text[self.pos + 1] == "-":
            low, high = text[self.pos], text[self.pos + 2:self.pos + 3]
            self.pos += 3
            if not high or text[self.pos:self.pos + 1] != "]":
                raise PatternError("a range class must be [lo-hi]")
            self.pos += 1
            if high < low:
                raise PatternError(f"range {low}-{high} is backwards")
            return CharClass(low=low, high=high, negate=negate)
        chars: list[str] = []
        while self.pos < len(text) and text[self.pos] != "]":
            if text[self.pos] == "\\" and self.pos + 1 < len(text):
                self.pos += 1
            chars.append(text[self.pos])
            self.pos += 1
        if self.pos >= len(text):
            raise PatternError("unclosed [")
        self.pos += 1
        if not chars:
            raise PatternError("empty []")
        return CharClass(chars=frozenset(chars), negate=negate)


def parse(pattern: str) -> tuple[object, ...]:
    """The terms of a pattern; PatternError when gobwas/glob would refuse it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternTooCostly(f"pattern longer than {MAX_PATTERN_CHARS} characters")
    return _Reader(pattern).sequence()


# -- the automaton ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Automaton:
    """States 0..n: state 0 accepts; a state has a test and one next state, or splits to several."""

    tests: list[object] = field(default_factory=lambda: [None])
    nexts: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    splits: list[bool] = field(default_factory=lambda: [False])
    loops: dict[int, int] = field(default_factory=dict)  # the `*` loop state -> its split

    def add(self, test: object, nexts: tuple[int, ...], split: bool = False) -> int:
        self.tests.append(test)
        self.nexts.append(nexts)
        self.splits.append(split)
        return len(self.tests) - 1

    def build(self, terms: tuple[object, ...], after: int) -> int:
        """Add the states of `terms`, followed by state `after`; returns the first state."""
        start = after
        for term in reversed(terms):
            if term is STAR:
                split = self.add(None, (), split=True)
                loop = self.add(_ANY, (split,))
                self.loops[loop] = split
                self.nexts[split] = (loop, start)
                start = split
            elif isinstance(term, Alternatives):
                start = self.add(None, tuple(self.build(opt, start) for opt in term.options), split=True)
            else:
                start = self.add(term, (start,))
        return start

    def closure(self, states: list[int]) -> tuple[frozenset[int], int]:
        """The testing (and accepting) states reached through splits, and how many were visited."""
        seen: set[int] = set()
        todo = list(states)
        out: set[int] = set()
        while todo:
            state = todo.pop()
            if state in seen:
                continue
            seen.add(state)
            if self.splits[state]:
                todo.extend(self.nexts[state])
            else:
                out.add(state)
        return frozenset(out), len(seen)

    def passes(self, state: int, char: str) -> bool:
        if state == 0:  # accepting: nothing follows it
            return False
        test = self.tests[state]
        if test is _ANY:
            return True
        if isinstance(test, str):
            return test == char
        return char in test  # type: ignore[operator]


class _DfaState:
    __slots__ = ("accepts", "moves", "settled", "states")

    def __init__(self, states: frozenset[int], ends_open: frozenset[int]) -> None:
        self.states = states
        self.accepts = 0 in states
        # Whatever follows cannot change the answer: no state left (no match), or inside a `*`
        # whose loop reaches the end through splits only (a match).
        self.settled = not states or not ends_open.isdisjoint(states)
        self.moves: dict[str, _DfaState] = {}


class Matcher:
    """Tells whether channel names match one pattern, in time linear in the names' length.

    `budget` is the work left: one unit per character looked at, and per automaton state visited
    building the DFA. Past it, or past MAX_DFA_STATES or MAX_BUILD_VISITS, a call to the matcher
    raises PatternTooCostly.
    """

    def __init__(self, pattern: str, budget: int = DEFAULT_BUDGET) -> None:
        self.pattern = pattern
        self.budget = budget
        self._build_left = MAX_BUILD_VISITS
        self._automaton = _Automaton()
        auto = self._automaton
        start = auto.build(parse(pattern), 0)
        self._ends_open = frozenset(loop for loop, split in auto.loops.items() if 0 in auto.closure([split])[0])
        self._dfa: dict[frozenset[int], _DfaState] = {}
        self._start = self._state(self._automaton.closure([start]))

    def _state(self, closure: tuple[frozenset[int], int]) -> _DfaState:
        states, cost = closure
        self.budget -= cost
        self._build_left -= cost
        if self.budget < 0 or self._build_left < 0:
            raise PatternTooCostly("pattern too costly to match")
        known = self._dfa.get(states)
        if known is None:
            if len(self._dfa) >= MAX_DFA_STATES:
                raise PatternTooCostly("pattern too costly to match")
            known = self._dfa[states] = _DfaState(states, self._ends_open)
        return known

    def _move(self, state: _DfaState, char: str) -> _DfaState:
        auto = self._automaton
        targets = [auto.nexts[s][0] for s in state.states if auto.passes(s, char)]
        following = self._state(auto.closure(targets))
        state.moves[char] = following
        return following

    def __call__(self, channel: str) -> bool:
        """Whether `channel` matches; spends one unit of budget per character looked at."""
        state = self._start
        steps = 0
        for steps, char in enumerate(channel, 1):  # noqa: B007 (read after the loop)
            if state.settled:
                break
            state = state.moves.get(char) or self._move(state, char)
        self.budget -= steps + 1
        if self.budget < 0:
            raise PatternTooCostly("pattern too costly to match")
        return state.accepts


def channel_matcher(pattern: str, budget: int = DEFAULT_BUDGET) -> Matcher:
    """A Matcher for `pattern`; the empty pattern matches every channel, as `*` does.

    Raises PatternError (gobwas would not compile it) or PatternTooCostly (too long).
    """
    return Matcher(pattern or "*", budget)
