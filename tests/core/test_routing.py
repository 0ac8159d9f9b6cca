"""Route matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bungate.core.routing import PatternError, Router, compile_pattern


def router():
    return Router(
        [
            ("/api/*", "api"),
            ("/api/admin/*", "admin"),
            ("/users/:id", "user"),
            ("/users/:id/posts/*", "posts"),
            ("/health", "health"),
        ]
    )


@pytest.mark.parametrize(
    "path, route, params",
    [
        ("/health", "health", {}),
        ("/api", "api", {}),
        ("/api/", "api", {}),
        ("/api/x/y", "api", {}),
        ("/api/admin/x", "admin", {}),
        ("/users/42", "user", {"id": "42"}),
        ("/users/42/posts/7", "posts", {"id": "42"}),
        ("/apix", None, None),
        ("/healthz", None, None),
        ("/users", None, None),
    ],
)
def test_precedence(path, route, params):
    m = router().match(path)
    if route is None:
        assert m is None
    else:
        assert m is not None and (m.route, m.params) == (route, params)


def test_catch_all_is_last_resort():
    r = Router([("/*", "all"), ("/a", "a")])
    assert r.match("/a").route == "a"
    assert r.match("/zzz").route == "all"
    assert r.match("/").route == "all"


def test_duplicates_and_bad_patterns_are_refused():
    with pytest.raises(PatternError, match="already routed"):
        Router([("/a", 1), ("/a", 2)])
    for bad in ["a", "/a*", "/a/*/b", "/a?x", "/:a/:a", "/a b"]:
        with pytest.raises(PatternError):
            compile_pattern(bad)


@given(st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=5))
def test_a_prefix_matches_every_path_below_it(segments):
    r = Router([("/" + segments[0] + "/*", "p")])
    assert r.match("/" + "/".join(segments)).route == "p"
    assert r.match("/" + segments[0] + "x") is None
