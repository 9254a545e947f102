"""Parsing WWW-Authenticate challenges (RFC 7235) the way registries send them."""

from __future__ import annotations

import pytest

from microagent.images.credentials import Challenge, parse_www_authenticate


def test_docker_hub_bearer_challenge() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/ubuntu:pull"')
    assert parse_www_authenticate(header) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    })]


def test_quoted_values_keep_their_commas_and_escapes() -> None:
    header = r'Bearer realm="http://a/token?x=1,y=2",scope="repository:a/b:pull,push",' \
             r'error="insufficient_scope",detail="say \"hi\", \\ok"'
    [challenge] = parse_www_authenticate(header)
    assert challenge.params == {
        "realm": "http://a/token?x=1,y=2",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
        "detail": 'say "hi", \\ok',
    }


def test_basic_challenge_and_case_insensitive_names() -> None:
    assert parse_www_authenticate('BASIC Realm="Registry Realm"') == \
        [Challenge("basic", {"realm": "Registry Realm"})]


def test_several_challenges_in_one_header_and_across_headers() -> None:
    challenges = parse_www_authenticate([
        'Basic realm="one", Bearer realm="two" , service=svc,scope="repository:x:pull"',
        "Negotiate dG9rZW42OA==, Bearer realm=three",
    ])
    assert challenges == [
        Challenge("basic", {"realm": "one"}),
        Challenge("bearer", {"realm": "two", "service": "svc", "scope": "repository:x:pull"}),
        Challenge("negotiate", {}),
        Challenge("bearer", {"realm": "three"}),
    ]


@pytest.mark.parametrize(("header", "expected"), [
    ("", []),
    ("   ", []),
    (",,", []),
    ('="x"', []),
    ('realm="no scheme"', []),
    ("Bearer ,", [Challenge("bearer", {})]),
    ('Bearer realm="unterminated', [Challenge("bearer", {})]),
])
def test_malformed_headers_do_not_raise(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_parameters_never_leak_into_the_previous_headers_challenge() -> None:
    assert parse_www_authenticate(['Basic realm="a"', 'realm="b"']) == \
        [Challenge("basic", {"realm": "a"})]


def test_unquoted_values_and_spaces_around_equals() -> None:
    [challenge] = parse_www_authenticate("Bearer realm = http://h:1/t , service = reg")
    assert challenge.params == {"realm": "http://h:1/t", "service": "reg"}
