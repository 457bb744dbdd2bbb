"""The decoder pool: one DALI decoder per concurrent caller, built when first needed, at most
``max_decoders``, callers beyond the cap waiting for a free one (real DALI decoders on the CPU)."""

from __future__ import annotations

import threading
import time

import pytest

from engines.base import EngineError

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def _options(**kwargs):
    from images.dali_decoder import DaliDecoderOptions

    return DaliDecoderOptions(**{"device": "cpu", "max_batch": 4, "threads": 1, **kwargs})


def test_a_decoder_per_concurrent_caller_up_to_the_cap_and_the_next_caller_waits_for_a_free_one():
    from images.dali_decoder import DecoderPool

    pool = DecoderPool(_options(), max_decoders=2)
    assert pool.built == 0  # nothing is built before a caller needs it
    taken = []
    try:
        with pool.borrow() as a:
            with pool.borrow() as b:
                assert a is not b and pool.built == 2

                def third():
                    with pool.borrow() as c:
                        taken.append(c)

                waiter = threading.Thread(target=third, daemon=True)
                waiter.start()
                time.sleep(0.5)
                assert taken == [] and pool.built == 2  # over the cap: it waits, nothing more is built
            waiter.join(timeout=10)
            assert taken == [b]  # the one given back
        with pool.borrow() as d:  # one caller at a time reuses a built decoder
            assert d in (a, b) and pool.built == 2
    finally:
        pool.close()
    assert a._pipe is None and b._pipe is None  # close() closed every decoder it built
    with pytest.raises(EngineError, match="closed"):
        with pool.borrow():
            pass


def test_without_a_cap_every_concurrent_caller_gets_its_own_decoder():
    from images.dali_decoder import DecoderPool

    pool = DecoderPool(_options())
    try:
        with pool.borrow() as a, pool.borrow() as b, pool.borrow() as c:
            assert len({id(a), id(b), id(c)}) == 3 and pool.built == 3
    finally:
        pool.close()


def test_a_decoder_that_cannot_be_built_fails_each_caller_and_frees_its_place():
    from images.dali_decoder import DecoderPool

    # There is no GPU 99 (nor any GPU in CI): the build fails, as on a worker with a broken driver.
    pool = DecoderPool(_options(device="gpu", device_id=99), max_decoders=1)
    for _ in range(2):  # the failed build gave its place back: the second caller does not wait forever
        with pytest.raises(EngineError, match="cannot build the DALI gpu decoder"):
            with pool.borrow():
                pass
    assert pool.built == 0
    with pytest.raises(EngineError, match=r"max_decoders must be >= 0 \(0: one per concurrent caller\), got -1"):
        DecoderPool(_options(), max_decoders=-1)
