"""busi.pipeline: stages that run ahead of their consumer keep the order, raise errors in place and overlap."""
import threading

import pytest

from busi.pipeline import ahead, import_ahead


def test_stacked_stages_keep_the_order_of_the_items():
    assert list(ahead(ahead(range(20), lambda x: x * 2), lambda x: x + 1)) == [2 * x + 1 for x in range(20)]


def test_an_error_in_a_step_reaches_the_consumer_after_the_items_before_it():
    def step(x):
        if x == 3:
            raise ValueError("image 3 is broken")
        return x

    seen = []
    with pytest.raises(ValueError, match="image 3"):
        for x in ahead(range(6), step):
            seen.append(x)
    assert seen == [0, 1, 2]


def test_the_next_item_is_worked_on_while_the_consumer_holds_this_one():
    started = [threading.Event() for _ in range(3)]

    def step(x):
        started[x].set()
        return x

    for x in ahead(range(3), step):
        if x + 1 < 3:  # the consumer waits here for the stage to start the next item: it runs ahead, not on demand
            assert started[x + 1].wait(5), f"item {x + 1} was not started while item {x} was being consumed"


def test_a_consumer_that_stops_early_stops_the_stage():
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    for x in ahead(endless(), lambda v: v, depth=1):
        if x == 2:
            break
    threading.Event().wait(0.6)  # the stage notices within its 0.2 s put timeout
    count = len(produced)
    threading.Event().wait(0.6)
    assert len(produced) == count and count < 10


def test_import_ahead_loads_modules_in_the_background_and_leaves_errors_to_the_caller():
    import sys
    sys.modules.pop("colorsys", None)
    import_ahead("colorsys", "busi_no_such_module").join(timeout=60)
    assert "colorsys" in sys.modules  # loaded; the missing one did not stop it or raise in the thread
    with pytest.raises(ModuleNotFoundError):
        __import__("busi_no_such_module")  # the caller's own import still reports it
