"""Broken configs: each names the key that is wrong, and `relay check` exits 2 with one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, parse_config

BASE = '''
[sources.hb]
type = "ticker"
[[routes]]
source = "hb"
channel = "chat:index"
'''

# (config text, the dotted key the error must name, a word the message must contain)
BROKEN = [
    ('[relay]\nstate_dir = 5\n' + BASE, "relay.state_dir", "string"),
    ('[relay]\nlog_level = "loud"\n' + BASE, "relay.log_level", "debug"),
    ('[relay]\nlog_format = "xml"\n' + BASE, "relay.log_format", "json"),
    ('[relay]\nshutdown_timeout = "10"\n' + BASE, "relay.shutdown_timeout", "unit"),
    ('[relay]\nshutdown_timeout = "10 parsecs"\n' + BASE, "relay.shutdown_timeout", "duration"),
    ('[relay]\nunmatched = "keep"\n' + BASE, "relay.unmatched", "drop"),
    ('[relay]\nstat_dir = "x"\n' + BASE, "relay.stat_dir", "did you mean 'state_dir'"),
    ('[relais]\nstate_dir = "x"\n' + BASE, "relais", "did you mean 'relay'"),
    ('[server]\nnamespaces = ["c"]\n' + BASE, "server.namespaces[0].name", "must match"),
    ('[server]\nnamespaces = [{name = "chat", history_size = -1}]\n' + BASE,
     "server.namespaces[0].history_size", "greater than or equal"),
    ('[server]\nnamespaces = ["chat", "chat"]\n' + BASE, "server.namespaces", "twice"),
    ('[server]\nenabled = "yes"\n' + BASE, "server.enabled", "boolean"),
    ('[server]\nmax_channels = 0\n' + BASE, "server.max_channels", "greater than or equal"),
    ('[server]\nmax_reply_bytes = "lots"\n' + BASE, "server.max_reply_bytes", "size"),
    ('[sink]\napi = "v4"\n' + BASE, "sink.api", "v6"),
    ('[sink]\nbatch_max_size = 0\n' + BASE, "sink.batch_max_size", "greater than or equal"),
    ('[sink]\nbatch_linger = 5\n' + BASE, "sink.batch_linger", "duration"),
    ('[sink]\nretry = { initial_backoff = "fast" }\n' + BASE, "sink.retry.initial_backoff", "duration"),
    ('[sink]\nretry = { max_elpased = "1s" }\n' + BASE, "sink.retry.max_elpased", "did you mean 'max_elapsed'"),
    ('[sink]\ntls = { enabled = true, cafile = "x" }\n' + BASE, "sink.tls.cafile", "did you mean 'ca_file'"),
    ('[sink]\nmax_message_bytes = "4 megs"\n' + BASE, "sink.max_message_bytes", "size"),
    ('[sources.hb]\ntype = "tickr"\n', "sources.hb.type", "did you mean 'ticker'"),
    ('[sources.hb]\ninterval = "1s"\n', "sources.hb.type", "missing"),
    ('[sources.hb]\ntype = "ticker"\nintervall = "1s"\n', "sources.hb.intervall", "did you mean 'interval'"),
    ('[sources.hb]\ntype = "ticker"\ninterval = "soon"\n', "sources.hb.interval", "duration"),
    ('[sources.hb]\ntype = "ticker"\ncount = -3\n', "sources.hb.count", "greater than or equal"),
    ('[sources.hb]\ntype = "ticker"\ncron = "every minute"\n', "sources.hb.cron", "cron"),
    ('[sources.hb]\ntype = "ticker"\ndata = "{{ sequence }}"\n', "sources.hb.data", "unknown template field"),
    ('[sources.hb]\ntype = "ticker"\n[sources.hb]\ntype = "ticker"\n', "(toml)", "Cannot"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\n', "routes[0]", "exactly one of channel"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "a"\nchannels = ["b"]\n',
     "routes[0]", "exactly one of channel"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hbb"\nchannel = "chat:x"\n',
     "routes[0].source", "did you mean 'hb'"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nchannel = "chat:x"\n', "routes[0].source", "missing"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "chat:{{ kee }}"\n',
     "routes[0].channel", "unknown template field"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "chat:{{ key }"\n',
     "routes[0].channel", "unbalanced"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannels = ["chat:{{}}"]\n',
     "routes[0].channels", "empty placeholder"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\nwhen = { key = "room-[" }\n',
     "routes[0].when", "unbalanced"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\nwhen = { colour = "red" }\n',
     "routes[0].when", "cannot match on 'colour'"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\ndata = "yaml"\n',
     "routes[0].data", "json, wrap, raw"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\ntags = { a = 1 }\n',
     "routes[0].tags.a", "string"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\ncontinue = "y"\n',
     "routes[0].continue", "boolean"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchanel = "c"\n',
     "routes[0].chanel", "did you mean 'channel'"),
    ("[relay\n", "(toml)", "Expected"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "chat:{{ topic }}"\n',
     "routes[0].channel", "source 'hb' (ticker) never provides {{ topic }} (it provides source, seq, now"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\ndata = \'{"k": "{{ key }}"}\'\n',
     "routes[0].data", "never provides {{ key }}"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "c"\ntags = { t = "{{ header.x }}" }\n',
     "routes[0].tags.t", "never provides {{ header.x }}"),
    ('[sources.k]\ntype = "kafka"\nbrokers = ["h:1"]\ntopics = ["t"]\n[[routes]]\nsource = "k"\nchannel = "c"\n'
     'when = { "file.name" = "*.log" }\n', 'routes[0].when."file.name"', "source 'k' (kafka) never provides file.name"),
    ('[sources.f]\ntype = "file"\npaths = ["/tmp/x"]\n[[routes]]\nsource = "f"\nchannels = ["c", "d:{{ seq }}"]\n',
     "routes[0].channels[1]", "never provides {{ seq }}"),
    ('[sources.hb]\ntype = "ticker"\n[[routes]]\nsource = "hb"\nchannel = "chat:*"\n',
     "routes[0].channel", "reserved"),
    # issue 12 item 8: these escaped the one-line rule (a traceback, exit 1, or accepted)
    ("[relay]\nx = " + "[" * 1000 + "]" * 1000 + "\n" + BASE, "relay.x", "nested too deeply"),
    ('[[routes]]\nsource = "a"\n[[routes]]\nchannels = ' + "{a = " * 500 + "1" + "}" * 500 + "\n",
     "routes[1].channels", "nested too deeply"),
    ('[relay]\nmetrics_listen = "garbage"\n' + BASE, "relay.metrics_listen", "expected host:port"),
    ('[relay]\nmetrics_listen = "127.0.0.1:99999"\n' + BASE, "relay.metrics_listen", "outside 0..65535"),
    ('[server]\nlisten = "127.0.0.1:99999"\n' + BASE, "server.listen", "outside 0..65535"),
    ('[server]\nlisten = ":10000"\n' + BASE, "server.listen", "has no host"),
    ('[sink]\ntimeout = "0s"\n' + BASE, "sink.timeout", "greater than 0"),
    ('[sink]\naddress = "::::"\n' + BASE, "sink.address", "in brackets"),
    ('[sink]\naddress = "127.0.0.1:0"\n' + BASE, "sink.address", "outside 1..65535"),
    ('[sink]\nretry = { initial_backoff = "5s", max_backoff = "1s" }\n' + BASE, "sink.retry.max_backoff",
     "less than initial_backoff (5s)"),
    ('[sink]\nretry = { initial_backoff = "0s" }\n' + BASE, "sink.retry.initial_backoff", "greater than 0"),
]


@pytest.mark.parametrize(("text", "key", "word"), BROKEN, ids=[b[1] + ":" + b[2][:12] for b in BROKEN])
def test_broken_config_names_the_key(text: str, key: str, word: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "bad.toml")
    lines = caught.value.problems
    assert any(line.startswith(f"bad.toml: {key}") and word.lower() in line.lower() for line in lines), lines
    assert all(line.startswith("bad.toml: ") and "\n" not in line for line in lines)


def test_fields_a_source_provides_are_accepted() -> None:
    text = ('[sources.k]\ntype = "kafka"\nbrokers = ["h:1"]\ntopics = ["t"]\n'
            '[sources.hb]\ntype = "ticker"\n'
            '[[routes]]\nsource = "k"\nchannel = "chat:{{ key }}:{{ header.trace }}:{{ json.a.b }}"\n'
            'when = { topic = "t", "header.x" = "y" }\n'
            '[[routes]]\nsource = "hb"\nchannel = "tick:{{ seq }}"\n'
            'data = \'{"at": "{{ now }}", "s": "{{ source }}"}\'\n')
    assert len(parse_config(text).routes) == 2


def test_relay_check_refuses_a_field_the_routes_source_never_provides(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[sources.tick]\ntype = "ticker"\n[[routes]]\nsource = "tick"\nchannel = "chat:{{ topic }}"\n')
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{bad}: routes[0].channel: source 'tick' (ticker) never provides {{{{ topic }}}} "
        "(it provides source, seq, now, json.PATH)"], proc.stderr


def test_several_problems_are_all_reported() -> None:
    text = '[relay]\nlog_level = "x"\n[sink]\napi = "v9"\n[sources.a]\ntype = "nope"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.toml")
    keys = sorted(line.split(": ")[1] for line in caught.value.problems)
    assert keys == ["relay.log_level", "sink.api", "sources.a.type"]


def test_a_key_ending_in_a_newline_is_quoted_so_the_problem_stays_one_line() -> None:
    # Found by tests/test_fuzz.py: a bare-key check with `$` let "0\n" through unquoted.
    with pytest.raises(ConfigError) as err:
        parse_config('"relay" = {"0\\u000a" = []}', "f.toml")
    assert err.value.problems == ['f.toml: relay."0\\n": unknown key']


def test_relay_check_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\nlog_level = "x"\n[sink]\nbatch_max_size = 0\n' + BASE)
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{bad}: relay.log_level: ")
    assert lines[1].startswith(f"{bad}: sink.batch_max_size: ")
    assert "Traceback" not in proc.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", "run", "-c", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nope.toml: cannot read" in proc.stderr


def test_bare_namespace_gets_history_defaults() -> None:
    config = parse_config('[server]\nnamespaces = ["chat", {name = "cold", history_size = 0}]\n')
    chat, cold = config.server.namespaces
    assert (chat.history_size, chat.history_ttl) == (1000, 600.0)
    assert cold.history_size == 0


def test_durations_and_sizes() -> None:
    config = parse_config('[sink]\nbatch_linger = "250ms"\ntimeout = "2m"\nmax_message_bytes = "1MiB"\n')
    assert config.sink.batch_linger == 0.25
    assert config.sink.timeout == 120
    assert config.sink.max_message_bytes == 1024 * 1024


def test_relay_check_prints_the_resolved_pipeline() -> None:
    """The repository's default config, as `relay check` shows it: sources → routes → sink."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", "config.toml"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "  heartbeat (ticker)\n" in out
    assert "  applog (file) paths=['var/log/*.log'] read_from='end'\n" in out
    assert "  [0] heartbeat → chat:index data=json\n" in out
    assert "  [1] applog → chat:logs data=wrap\n" in out
    assert "  grpc v6 → 127.0.0.1:10000, api key from $RELAY_SERVER_API_KEY" in out
    assert "  namespaces: chat (history 1000, 600s)" in out


# Each is refused by `relay check` exactly as by `relay run`: exit 2, one line naming the key.
# "{d}" is the test's directory; files named there do not exist.
REFUSED_BY_BOTH = [
    ("x = " + "[" * 1000 + "]" * 1000 + "\n", "x", "nested too deeply"),
    ('[relay]\nmetrics_listen = "garbage"\n', "relay.metrics_listen", "expected host:port, got 'garbage'"),
    ('[relay]\nmetrics_listen = "127.0.0.1:99999"\n', "relay.metrics_listen", "outside 0..65535"),
    ('[server]\nenabled = true\nlisten = "127.0.0.1:99999"\n', "server.listen", "outside 0..65535"),
    ('[server]\nenabled = true\napi_key_file = "{d}/server.key"\n', "server.api_key_file",
     "cannot read {d}/server.key: No such file or directory"),
    ('[sink]\napi_key_file = "{d}/sink.key"\n', "sink.api_key_file", "cannot read {d}/sink.key"),
    ('[sink]\ntls = { enabled = true, ca_file = "{d}/ca.pem" }\n', "sink.tls.ca_file", "cannot read {d}/ca.pem"),
    ('[server]\ntls = { enabled = true, cert_file = "{d}/c.pem", key_file = "{d}/relay.toml" }\n',
     "server.tls.cert_file", "cannot read {d}/c.pem"),
    ('[sink]\ntls = { enabled = true, ca_file = "{d}/relay.toml" }\n', "sink.tls.ca_file", "is not a PEM file"),
    ('[sources.k]\ntype = "kafka"\nbrokers = ["127.0.0.1:9092"]\ntopics = ["t"]\nsecurity_protocol = "SSL"\n'
     'tls = { ca_file = "{d}/kafka-ca.pem" }\n', "sources.k.tls.ca_file", "cannot read {d}/kafka-ca.pem"),
    ('[sink]\ntimeout = "0s"\n', "sink.timeout", "greater than 0"),
    ('[sink]\naddress = "::::"\n', "sink.address", "in brackets"),
    ('[sink]\nretry = { initial_backoff = "5s", max_backoff = "1s" }\n', "sink.retry.max_backoff",
     "less than initial_backoff"),
]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("text", "key", "words"), REFUSED_BY_BOTH, ids=[c[1] for c in REFUSED_BY_BOTH])
def test_check_and_run_refuse_alike_with_one_line(tmp_path: Path, command: str, text: str, key: str,
                                                  words: str) -> None:
    """A config `relay check` calls ok must not be one `relay run` refuses, nor the other way round."""
    config = tmp_path / "relay.toml"
    state = f'state_dir = "{tmp_path}/state"\n'
    body = text.replace("{d}", str(tmp_path))
    if body.startswith("[relay]\n"):
        body = body.replace("[relay]\n", "[relay]\n" + state, 1)
    else:
        body += '[relay]\nmetrics_listen = ""\n' + state
    config.write_text(body)
    proc = subprocess.run([sys.executable, "-m", "relay", command, "-c", str(config)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{config}: {key}: ") and words.replace("{d}", str(tmp_path)) in lines[0], lines
