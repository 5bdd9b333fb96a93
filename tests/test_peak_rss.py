"""host_memory.PeakRss: nested spans each see their own peak, and the outer one the peak of all."""

import numpy as np
import pytest

from rema_jax.host_memory import PeakRss, peak_rss_mib

pytestmark = pytest.mark.skipif(peak_rss_mib() is None, reason="VmHWM needs Linux /proc")


def _touch(mib: int) -> np.ndarray:
    return np.ones(mib * 2**20 // 8)  # written, so resident


def test_nested_spans_report_their_own_peak_and_the_outer_one_all():
    with PeakRss() as outer:
        with PeakRss() as big:
            a = _touch(400)
            del a
        with PeakRss() as small:  # the 400 MiB block is freed: this span's peak is lower
            b = _touch(50)
            del b
    assert big.mib is not None and small.mib is not None
    assert big.mib - small.mib > 250
    assert outer.mib >= big.mib  # the enclosing span keeps the inner peak though the mark was reset


def test_a_span_that_raises_still_records_and_leaves_the_stack():
    with pytest.raises(RuntimeError):
        with PeakRss() as span:
            raise RuntimeError("boom")
    assert span.mib is not None and not PeakRss._stack()
