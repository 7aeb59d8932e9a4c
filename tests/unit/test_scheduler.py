"""choose_node: preference order, refusals with reasons, and properties over random clusters."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.cluster.scheduler import Choice, NodeView, choose_node
from pool.errors import Incompatible, NoCapacity, NodeUnavailable

T = "py-hello"


def node(name, healthy=True, templates=(), free=4, compatible=True):
    return NodeView(name, healthy, frozenset(templates), free, compatible)


def test_prefers_a_node_that_holds_the_template_over_more_capacity():
    nodes = [node("a", free=10), node("b", templates=[T], free=1), node("c", templates=[T], free=3)]
    c = choose_node(nodes, T)
    assert c == Choice("c", True, {"a": "does not hold the template", "b": "fewer free slots"})


def test_most_free_capacity_when_nobody_holds_it():
    c = choose_node([node("a", free=2), node("b", free=5), node("c", healthy=False)], T)
    assert (c.node, c.cached) == ("b", False)
    assert c.skipped["c"] == "unhealthy"


def test_ties_are_broken_by_name():
    assert choose_node([node("b"), node("a")], T).node == "a"


def test_preferred_node_is_used_even_if_another_looks_better():
    c = choose_node([node("a", templates=[T], free=9), node("b", free=1)], T, prefer="b")
    assert (c.node, c.cached) == ("b", False)


@pytest.mark.parametrize("view,error,text", [
    (None, NodeUnavailable, "no node named 'x' (known: a)"),
    (node("x", healthy=False), NodeUnavailable, "node 'x' cannot take a spawn of 'py-hello': unhealthy"),
    (node("x", free=0), NoCapacity, "no free capacity"),
    (node("x", compatible="CRIU 4.1 < 4.2"), Incompatible, "incompatible: CRIU 4.1 < 4.2"),
])
def test_preferred_node_that_cannot_take_it_is_an_error(view, error, text):
    nodes = [node("a", templates=[T])] + ([view] if view else [])
    with pytest.raises(error) as e:
        choose_node(nodes, T, prefer="x")
    assert text in e.value.message


def test_no_node_fits_lists_every_reason():
    nodes = [node("a", healthy=False), node("b", free=0), node("c", compatible=False),
             node("d", compatible="kernel 5.10 is older than 6.18")]
    with pytest.raises(NoCapacity) as e:
        choose_node(nodes, T)
    assert e.value.message == (
        "no node can take a spawn of 'py-hello' (a: unhealthy; b: no free capacity; "
        "c: incompatible; d: incompatible: kernel 5.10 is older than 6.18)")
    assert set(e.value.data["skipped"]) == {"a", "b", "c", "d"}


def test_all_incompatible_and_all_unhealthy_and_no_nodes():
    with pytest.raises(Incompatible):
        choose_node([node("a", compatible="arm64"), node("b", compatible=False)], T)
    with pytest.raises(NodeUnavailable, match="a: unhealthy; b: unhealthy"):
        choose_node([node("a", healthy=False), node("b", healthy=False)], T)
    with pytest.raises(NodeUnavailable, match="no nodes"):
        choose_node([], T)


def test_duplicate_names_are_a_bug():
    with pytest.raises(ValueError):
        choose_node([node("a"), node("a")], T)


nodes_strategy = st.lists(
    st.builds(NodeView,
              name=st.text("abcdefgh", min_size=1, max_size=3),
              healthy=st.booleans(),
              templates=st.frozensets(st.sampled_from([T, "other"])),
              free=st.integers(-1, 5),
              compatible=st.one_of(st.just(True), st.just(False), st.sampled_from(["arm64", ""]))),
    max_size=8, unique_by=lambda n: n.name)


@settings(max_examples=300, deadline=None)
@given(nodes_strategy, st.randoms())
def test_properties(nodes, rnd):
    fit = [n for n in nodes if n.problem(T) is None]
    try:
        c = choose_node(nodes, T)
    except (NoCapacity, NodeUnavailable, Incompatible) as e:
        assert not fit
        for n in nodes:  # every node is named with its reason
            assert f"{n.name}: {n.problem(T)}" in e.message
        return
    chosen = next(n for n in nodes if n.name == c.node)
    assert chosen.problem(T) is None                          # healthy, compatible, has room
    assert c.cached == (T in chosen.templates)
    if any(T in n.templates for n in fit):
        assert c.cached                                       # holding the template wins
    same = [n for n in fit if (T in n.templates) == c.cached]
    assert chosen.free == max(n.free for n in same)           # then the most free capacity
    assert set(c.skipped) == {n.name for n in nodes} - {c.node}
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert choose_node(shuffled, T) == c                      # the input order does not matter
    assert choose_node(nodes, T, prefer=c.node).node == c.node
