"""bcjax.train.periodic.itstime on made-up step and epoch counts (no training)."""

from bcjax.train.periodic import itstime


def fired(every, total, **kw):
    return [n for n in range(1, total + 1) if itstime(n, every, total, **kw)]


def test_every_period_and_the_last():
    assert fired(3, 10) == [3, 6, 9, 10]
    assert fired(5, 10) == [5, 10]  # the last is due anyway: no double firing
    assert fired(1, 4) == [1, 2, 3, 4]


def test_the_last_only_when_asked():
    assert fired(3, 10, last=False) == [3, 6, 9]
    assert fired(20, 10) == [10]  # a period longer than the run: only the end


def test_no_period_never_fires_on_its_own():
    assert fired(0, 5) == [5]
    assert fired(0, 5, last=False) == []
    assert not itstime(0, 3, 10)  # nothing done yet


def test_counts_resume_where_they_were():
    # A run resumed at step 6 of 10 logs on the same steps as an uninterrupted one.
    assert [n for n in range(7, 11) if itstime(n, 2, 10)] == [8, 10]
