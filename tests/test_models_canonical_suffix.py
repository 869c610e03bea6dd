"""The mktemp-suffix rule's test (models.canonical._random_suffix) reads a token with string
methods instead of scanning it per character; on every token the rule can see (ASCII letters
and digits, 6 or more) it must decide as the per-character definition does. The tmp-prefix
rule replaces its one anchored match without a substitution template."""

from __future__ import annotations

import random
import re
import string

from driftwarden.models.canonical import _random_suffix, canonical_component

_TOKEN = re.compile(r"([A-Za-z0-9]{6,})")


def _reference(token: str) -> str:
    """The rule as documented: a digit and a letter, or mixed case after the first char."""
    has_digit = any(c.isdigit() for c in token)
    has_alpha = any(c.isalpha() for c in token)
    mixed_case = any(c.isupper() for c in token[1:]) and any(c.islower() for c in token)
    return "*" if (has_digit and has_alpha) or mixed_case else token


def _tokens(rng: random.Random, n: int) -> list[str]:
    alphabets = [string.ascii_lowercase, string.ascii_uppercase, string.digits,
                 string.ascii_letters, string.ascii_lowercase + string.digits,
                 string.ascii_letters + string.digits]
    out = []
    for _ in range(n):
        alphabet = rng.choice(alphabets)
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(6, 14))))
    return out


def test_the_suffix_test_decides_as_the_per_character_definition_on_random_tokens():
    rng = random.Random(12)
    tokens = [*_tokens(rng, 30_000), "Debian", "README", "aB3dEf", "k3J9xQ2p1Z", "ABCDEF",
              "abcdef", "123456", "Abcdef", "abcdeF", "A12345"]
    differ = [t for t in tokens if _random_suffix(_TOKEN.fullmatch(t)) != _reference(t)]
    assert differ == []


def test_mktemp_suffixes_through_the_whole_rule_set():
    assert canonical_component("tmp.k0001234x") == "tmp.*"
    assert canonical_component("sh-thd.aB3dEf") == "sh-thd.*"
    assert canonical_component("upload_Xq9TzA.txt") == "upload_*.txt"
    assert canonical_component("README.Debian") == "README.Debian"
    assert canonical_component("tmp.abcdef") == "tmp.abcdef"
    assert canonical_component("tmp.ABCDEF") == "tmp.ABCDEF"
    assert canonical_component("tmp.AbcdeF") == "tmp.*"


def test_the_tmp_prefix_rule_replaces_only_what_follows_the_prefix():
    assert canonical_component("tmpk3j9x2qz") == "tmp*"
    assert canonical_component(".tmpAbCdEf_9") == ".tmp*"
    assert canonical_component("tmpabcdef.log") == "tmp*.log"
    assert canonical_component("tmpabc") == "tmpabc"  # fewer than 6 after the prefix
    assert canonical_component("xtmpabcdefg") == "xtmpabcdefg"
