"""The reload plan (relay/reload_plan.py): from two configs alone, what SIGHUP keeps, stops and starts.

The SIGHUP tests in tests/test_daemon.py run these plans against a real relay; here each case of
the decision is pinned on its own.
"""

from __future__ import annotations

from relay.config import Config, parse_config
from relay.reload_plan import ReloadPlan, plan_reload
from tests.harness.configs import sink_table, ticker_tables

SINK = sink_table("127.0.0.1:10000")


def config(*, relay: str = "", sources: str = "", extra: str = "") -> Config:
    text = f"[relay]\nstate_dir = \"/tmp/relay-plan\"\n{relay}\n{SINK}\n"
    text += sources or ticker_tables("a:x", name="a") + ticker_tables("b:x", name="b")
    return parse_config(text + extra)


OLD = config()


def test_nothing_changed() -> None:
    assert plan_reload(OLD, config()) == ReloadPlan(unchanged=True, rebuild_pipeline=False, move_status=False,
                                                   restart_server=False, keep=("a", "b"))


def test_only_metrics_listen_moves_the_status_endpoints_and_nothing_else() -> None:
    plan = plan_reload(OLD, config(relay='metrics_listen = "127.0.0.1:9999"'))
    assert plan == ReloadPlan(unchanged=False, rebuild_pipeline=False, move_status=True,
                              restart_server=False, keep=("a", "b"))


def test_a_changed_source_restarts_alone() -> None:
    new = config(sources=ticker_tables("a:x", name="a") + ticker_tables("b:x", name="b", interval="1s"))
    plan = plan_reload(OLD, new)
    assert (plan.rebuild_pipeline, plan.keep, plan.stop, plan.start) == (True, ("a",), ("b",), ("b",))
    assert not plan.move_status and not plan.restart_server


def test_an_added_source_starts_and_the_others_keep_running() -> None:
    new = config(sources=ticker_tables("a:x", name="a") + ticker_tables("b:x", name="b")
                 + ticker_tables("c:x", name="c"))
    plan = plan_reload(OLD, new)
    assert (plan.rebuild_pipeline, plan.keep, plan.stop, plan.start) == (True, ("a", "b"), (), ("c",))


def test_a_removed_source_stops_and_starts_nowhere() -> None:
    plan = plan_reload(OLD, config(sources=ticker_tables("a:x", name="a")))
    assert (plan.rebuild_pipeline, plan.keep, plan.stop, plan.start) == (True, ("a",), ("b",), ())


def test_a_new_state_dir_restarts_every_source() -> None:
    new = parse_config(f"[relay]\nstate_dir = \"/tmp/relay-plan-2\"\n{SINK}\n"
                       + ticker_tables("a:x", name="a") + ticker_tables("b:x", name="b"))
    plan = plan_reload(OLD, new)
    assert (plan.rebuild_pipeline, plan.keep, plan.stop, plan.start) == (True, (), ("a", "b"), ("a", "b"))


def test_a_changed_server_restarts_it_and_keeps_the_sources() -> None:
    plan = plan_reload(OLD, config(extra='\n[server]\nenabled = true\nlisten = "127.0.0.1:0"\n'))
    assert (plan.rebuild_pipeline, plan.restart_server, plan.keep, plan.stop) == (True, True, ("a", "b"), ())


def test_changed_routes_rebuild_the_pipeline_and_keep_every_source() -> None:
    new = config(extra='\n[[routes]]\nsource = "a"\nchannel = "more:x"\n')
    plan = plan_reload(OLD, new)
    assert plan == ReloadPlan(unchanged=False, rebuild_pipeline=True, move_status=False, restart_server=False,
                              keep=("a", "b"), stop=(), start=())
