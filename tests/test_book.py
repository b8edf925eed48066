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


def test_points_formats_a_comparison_and_a_difference():
    from bnlib import analysis
    from bnlib.book import points
    x = [0.90, 0.92, 0.91, 0.93, 0.95, 0.90, 0.94, 0.92]
    y = [0.88, 0.90, 0.90, 0.90, 0.93, 0.89, 0.91, 0.90]
    d = analysis.paired_difference(x, y)
    assert points(d) == (f"{100 * d.mean:+.1f} points (95% CI {100 * d.ci_low:+.1f} to "
                         f"{100 * d.ci_high:+.1f})")
    c = analysis.compare(x, y, margin=0.005)
    assert points(c) == points(c.diff)[:-1] + f"; {c.verdict})"
    assert points(d).startswith("+2.0 points (95% CI +")  # mean of the differences: 0.02
    # worked by hand: a CI end at −0.0003 is −0.03 points, not "−0.0"; an exact 0 stays "+0.0"
    tiny = analysis.Diff(n=8, mean=-0.005, sd=0.006, ci_low=-0.010, ci_high=-0.0003, p=0.08)
    assert points(tiny) == "-0.5 points (95% CI -1.0 to -0.03)"
    from bnlib.book import _points
    assert (_points(-0.03), _points(0.0), _points(0.04), _points(1.26)) == ("-0.03", "+0.0", "+0.04", "+1.3")
