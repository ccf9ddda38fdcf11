"""The ticker's messages: data is its template rendered (filled per batch as a bytes %-format, so
every kind of template is checked against Template.render), seq from 1, positions in order."""

from __future__ import annotations

import asyncio

import pytest

from relay.sources.ticker import DEFAULT_DATA, Config, Ticker
from relay.templates import Template

TEMPLATES = [
    DEFAULT_DATA,
    '{"a": {{ seq }}, "b": {{seq}}, "c": {{ seq }}}',  # seq several times
    '{"off": "100% {{ seq }}%d %s", "who": "{{ source }}", "at": "{{ now }}"}',  # % is not a format
    '{"constant": "50%% off, é ✓"}',  # no field at all
    '"{{ now }}"',  # now alone
    '{"name": "{{ source }}"}',
]


@pytest.mark.parametrize("data", TEMPLATES)
def test_data_is_the_template_rendered(data: str) -> None:
    name = "tick%d_é"
    ticker = Ticker(name, Config(type="ticker", interval="0s", count=1200, data=data))
    seqs: list[int] = []
    while True:
        batches = asyncio.run(ticker.read())
        if batches is None:
            break
        for batch in batches:
            assert batch.end == batch.messages[-1].offset + 1
            for msg in batch.messages:
                now = msg.attributes["now"]
                expected = Template.compile(data).render({"seq": str(msg.offset), "now": now, "source": name}.get)
                assert msg.data == expected.encode()
                assert msg.attributes == {"seq": msg.offset, "now": now}
                assert (msg.source, msg.key, msg.stream) == (name, None, ticker._stream)
                seqs.append(msg.offset)
    assert seqs == list(range(1, 1201))
