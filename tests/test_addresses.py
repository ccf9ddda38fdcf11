"""One `host:port` parser (relay/addresses.py), and every option and flag that takes an address
going through it: the same text is accepted or refused, with the same words, wherever it is written."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from relay.addresses import HostPort, parse_host_port
from relay.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = [
    ("127.0.0.1:10000", HostPort("127.0.0.1", 10000)),
    ("localhost:1", HostPort("localhost", 1)),
    ("centrifugo.internal-1.example:65535", HostPort("centrifugo.internal-1.example", 65535)),
    ("kafka_1:9092", HostPort("kafka_1", 9092)),
    ("0.0.0.0:9108", HostPort("0.0.0.0", 9108)),
    ("[::1]:10000", HostPort("::1", 10000)),
    ("[2001:db8::5]:443", HostPort("2001:db8::5", 443)),
]

# (text, words of the error)
BAD = [
    ("garbage", "expected host:port, got 'garbage'"),
    ("", "expected host:port"),
    ("::::", "in brackets"),
    ("::1:10000", "in brackets"),
    (":10000", "has no host"),
    ("127.0.0.1:", "not a number"),
    ("127.0.0.1:http", "not a number"),
    ("127.0.0.1:-1", "not a number"),
    ("127.0.0.1:\uff11\uff12", "not a number"),  # fullwidth digits: isdigit() says yes
    ("127.0.0.1:99999", "outside "),
    ("127.0.0.1:0", "outside 1..65535"),
    ("[::1]", '"[IPv6 address]:port"'),
    ("[localhost]:80", "not an IPv6 address"),
    ("a b:80", "not a host name"),
    ("a/b:80", "not a host name"),
    ("http://x:80", "without a scheme"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_good_addresses(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(("text", "words"), BAD)
def test_bad_addresses_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_host_port(text)
    assert words in str(caught.value)


def test_port_zero_only_where_any_port_will_do() -> None:
    assert parse_host_port("127.0.0.1:0", any_port=True) == HostPort("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        parse_host_port("127.0.0.1:65536", any_port=True)


TICKER = '[sources.t]\ntype = "ticker"\n[[routes]]\nsource = "t"\nchannel = "chat:x"\n'
# Every config option that takes an address, as TOML with the address in place of ADDR.
OPTIONS = {
    "relay.metrics_listen": '[relay]\nmetrics_listen = "ADDR"\n' + TICKER,
    "server.listen": '[server]\nlisten = "ADDR"\n' + TICKER,
    "sink.address": '[sink]\naddress = "ADDR"\n' + TICKER,
    "sources.k.brokers": '[sources.k]\ntype = "kafka"\nbrokers = ["ADDR"]\ntopics = ["t"]\n',
}


# Where BAD does not apply: "" turns the metrics endpoints off; a listen address may take port 0.
MEANINGFUL = {("relay.metrics_listen", ""), ("relay.metrics_listen", "127.0.0.1:0"),
              ("server.listen", "127.0.0.1:0")}


@pytest.mark.parametrize(("key", "text", "words"),
                         [(key, *bad) for key in OPTIONS for bad in BAD if (key, bad[0]) not in MEANINGFUL])
def test_every_address_option_refuses_alike(key: str, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(OPTIONS[key].replace("ADDR", text), "f.toml")
    assert len(caught.value.problems) == 1, caught.value.problems
    line = caught.value.problems[0]
    assert line.startswith(f"f.toml: {key}: ") and words in line, line


@pytest.mark.parametrize("key", list(OPTIONS))
def test_every_address_option_takes_ipv6_in_brackets(key: str) -> None:
    parse_config(OPTIONS[key].replace("ADDR", "[::1]:10000"), "f.toml")


@pytest.mark.parametrize(("args", "words"), [
    (["publish", "chat:x", "{}", "--address", "::::"], "argument --address: an IPv6 address is written in brackets"),
    (["tail", "chat:x", "--address", "nowhere"], "argument --address: expected host:port, got 'nowhere'"),
    (["serve", "--listen", "127.0.0.1:99999"], "relay serve: server.listen: port 99999 of '127.0.0.1:99999' is "
                                                "outside 0..65535"),
])
def test_command_line_addresses_are_checked_alike(args: list[str], words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_no_other_module_splits_host_and_port() -> None:
    """The parser is the only place that takes `host:port` apart."""
    offenders = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        if "proto" in path.parts or path.name == "addresses.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("rpartition", "rsplit", "partition", "split")
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == ":"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
