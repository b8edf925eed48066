"""The scorecard helper refuses key numbers that are not finite measurements."""
import pytest

from bnlib.book import VERDICTS, Verdict, verdict


def test_verdict_returns_a_quiet_pair():
    v = verdict("K2", "true", "max |bnlib − torch| = 2e-7")
    word, key = v
    assert isinstance(v, Verdict) and (word, key) == ("true", "max |bnlib − torch| = 2e-7")
    assert v._ipython_display_() is None and "inconclusive" in VERDICTS


@pytest.mark.parametrize("key", ["infx fewer steps", "2.0x and infx", "0.00x the time", "ratio nan",
                                 "no number here", "inf"])
def test_verdict_refuses_non_finite_key_numbers(key):
    with pytest.raises(ValueError):
        verdict("K1", "true", key)


@pytest.mark.parametrize("key", ["1.8x fewer steps", "0.63x the time", "0.001 apart", "10.00x",
                                 "at depth 32: 0.50 vs 0.92", "BN info: 3 of 8 reached"])
def test_verdict_accepts_finite_key_numbers(key):
    verdict("K1", "partly true", key)


def test_verdict_word_is_checked():
    with pytest.raises(ValueError, match="verdict must start with"):
        verdict("K1", "probably", "1.0")
