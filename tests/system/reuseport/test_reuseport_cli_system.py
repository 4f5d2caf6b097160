"""``flowsteer group`` against real groups: list, show, drain, undrain, weights, policy, explain."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from click.testing import CliRunner

from flowsteer.cli import main
from flowsteer.reuseport import Flow
from flowsteer.testing.flows import tcp_landing

MakeGroup = Callable[..., Any]


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, ["group", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


def test_commands_read_and_change_the_group(make_group: MakeGroup) -> None:
    group, members = make_group("tcp:192.0.2.30:9200", range(3))
    spec = str(group.id)
    assert run("list", "--json") == [spec]
    shown = run("show", spec, "--json")
    assert [m["state"] for m in shown["members"]] == ["live"] * 3 and shown["policy"] == "consistent"
    assert "MEMBER  STATE" in run("show", spec)

    drained = run("drain", spec, "1", "--json")
    assert [m["state"] for m in drained["members"]] == ["live", "drained", "live"]
    assert drained["members"][1]["share"] == 0
    assert run("undrain", spec, "1").splitlines()[0] == "member 1 takes new connections and flows again"
    assert run("drain", spec, "2").splitlines()[0] == \
        "member 2 drained: no new connections or flows; its established ones stay"
    run("undrain", spec, "2")

    assert run("policy", spec, "weighted").splitlines()[0] == "policy weighted in force"
    assert run("weights", spec, "1=2").splitlines()[0] == "weights set: 1=2"
    assert run("weights", spec).startswith("group tcp:192.0.2.30:9200 ")  # no pairs: shown, no change said
    weights = run("weights", spec, "0=1", "1=0", "2=3", "--json")
    assert [m["weight"] for m in weights["members"]] == [1, 0, 3]
    assert [m["state"] for m in weights["members"]] == ["live", "idle", "live"]  # weight 0: no new flows
    assert 0.7 < weights["members"][2]["share"] < 0.8

    answer = run("explain", spec, "198.51.100.9:41000", "--json")
    flow = Flow.parse("tcp", "198.51.100.9:41000", "192.0.2.30:9200")
    assert answer["outcome"] == "member" and answer["reason"] == "table"
    assert tcp_landing({s: m.socket for s, m in members.items()}, [flow])[flow] == answer["member"]
    assert run("explain", spec, "198.51.100.9:41000").startswith(f"member {answer['member']} (table)")


def test_errors_from_the_state_are_messages(make_group: MakeGroup, netns: Any) -> None:
    group, _ = make_group("udp:192.0.2.31:9201", range(2))
    for args, message in ((["show", "udp:192.0.2.31:9999"], "no reuseport group"),
                          (["drain", str(group.id), "7"], "has no member 7")):
        result = CliRunner().invoke(main, ["group", *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    # --netns reaches the namespace from outside of it by name
    assert str(group.id) in CliRunner().invoke(main, ["group", "list", "--netns", netns.name]).output


def test_a_change_that_leaves_no_live_member_warns(make_group: MakeGroup) -> None:
    group, _ = make_group("tcp:192.0.2.30:9210", range(2))
    spec = str(group.id)
    runner = CliRunner()
    first = runner.invoke(main, ["group", "drain", spec, "0"])
    assert first.exit_code == 0 and "warning" not in first.stderr
    last = runner.invoke(main, ["group", "weights", spec, "1=0"])
    assert last.exit_code == 0 and "no member of group tcp:192.0.2.30:9210 takes new connections now" in last.stderr, last.output


def test_weights_a_policy_would_ignore_are_refused_and_change_nothing(make_group: MakeGroup) -> None:
    group, _ = make_group("tcp:192.0.2.31:9201", range(2))
    spec = str(group.id)
    before = run("show", spec, "--json")
    refused = CliRunner().invoke(main, ["group", "weights", spec, "1=3"])
    assert refused.exit_code == 1
    assert refused.output == ("flowsteer: error: policy consistent ignores weights above 1 (1=3): use 0 (no new "
                              "flows) or 1, or policy weighted\n")
    assert run("show", spec, "--json") == before
    created = CliRunner().invoke(main, ["reuseport", "create", "tcp:192.0.2.31:9202", "0=2"])
    assert created.exit_code == 1 and "policy consistent ignores weights above 1 (0=2)" in created.output
    assert run("list", "--json") == [spec]  # the refused group was not made



def test_explain_takes_every_hooks_grammar_and_finds_the_group(make_group: MakeGroup) -> None:
    group, _ = make_group("tcp:192.0.2.32:9203", range(3))
    wild, _ = make_group("udp:[::]:9204", range(2))
    first_form = run("explain", str(group.id), "198.51.100.9:41000", "--json")
    assert run("explain", "tcp", "198.51.100.9:41000", "192.0.2.32:9203", "--json") == first_form
    via_wild = run("explain", "udp", "198.51.100.9:41000", "192.0.2.99:9204", "--json")
    assert via_wild == run("explain", str(wild.id), "198.51.100.9:41000", "--server", "192.0.2.99:9204", "--json")
    missing = CliRunner().invoke(main, ["reuseport", "explain", "tcp", "198.51.100.9:1", "192.0.2.32:9999"])
    assert missing.exit_code == 1
    assert missing.output.startswith("flowsteer: error: no tcp group reaches 192.0.2.32:9999 here; name one with --group")
    bad = CliRunner().invoke(main, ["reuseport", "explain", "sctp", "198.51.100.9:1", "192.0.2.32:9203"])
    assert bad.output == "flowsteer: error: protocol 'sctp' is not tcp or udp\n"
