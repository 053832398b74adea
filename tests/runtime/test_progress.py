"""Progress of long work: a batch job (--no-progress) gets a plain line a minute, a terminal
tqdm's bar."""

import torch
import tqdm.std

from cdmbench.evaluation.samples import write_shards
from cdmbench.runtime import progress


def counts(text: str) -> list[str]:
    """Each line up to its timings: 'desc: n/total unit'."""
    return [line.split(" [")[0] for line in text.splitlines()]


def test_a_batch_job_gets_a_line_a_minute_and_at_the_end_of_long_work(capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    with progress.bar(total=6, initial=2, progress=False, desc="train resnet50", unit="batch") as shown:
        for _ in range(4):  # 30 s a batch: due at 60 and 120 s, the end; the end is not repeated
            clock[0] += 30
            shown.update()
            shown.set_description("train resnet50 epoch 2/2")  # shows in the next line, prints none itself
    out = capsys.readouterr()
    assert counts(out.out) == ["train resnet50 epoch 2/2: 4/6 batch", "train resnet50 epoch 2/2: 6/6 batch"]
    assert out.out.splitlines()[0].endswith("[01:00 elapsed, 01:00 left, 30.00s/batch]")
    assert "\r" not in out.out and out.err == ""

    for _ in progress.bar(range(3), progress=False, desc="eval samples"):  # under a minute: no line
        clock[0] += 10
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_the_bar_and_a_disabled_process_nothing(capsys, monkeypatch):
    list(progress.bar(range(3), progress=True, desc="sweep"))
    out = capsys.readouterr()
    assert out.out == "" and "sweep" in out.err and "\r" in out.err
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    list(progress.bar(range(3), progress=False, disable=True, desc="sweep"))
    for shown in (True, False):  # counted by hand
        with progress.bar(total=3, progress=shown, disable=True, desc="train") as counted:
            counted.update()
    assert capsys.readouterr() == ("", "")


def test_evaluation_shards_already_written_count_as_done_but_not_in_the_rate(tmp_path, capsys, monkeypatch):
    """Shards 0 and 1 are cached; 2 and 3 take a minute each: the rate is a minute a shard."""
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])

    def make(k, lo, hi):
        clock[0] += 60
        return torch.full((hi - lo, 3, 4, 4), k, dtype=torch.uint8)

    write_shards(tmp_path, labels=torch.arange(2) % 2, shard_size=1, make=make, progress=False)
    capsys.readouterr()
    write_shards(tmp_path, labels=torch.arange(4) % 2, shard_size=1, make=make, progress=False)
    assert capsys.readouterr().out.splitlines() == [
        "eval samples: 3/4 shard [01:00 elapsed, 01:00 left, 60.00s/shard]",
        "eval samples: 4/4 shard [02:00 elapsed, 00:00 left, 60.00s/shard]"]


def test_a_batch_line_inside_a_terminal_bar_prints_on_a_line_of_its_own(monkeypatch):
    """The outer loop's bar (a terminal) is cleared for the inner loop's line, not glued to it."""
    import contextlib
    import io
    import sys

    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    screen = io.StringIO()  # stdout and stderr both go to the terminal
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        with progress.bar(total=2, progress=True, desc="eval samples", unit="shard", file=sys.stderr,
                          mininterval=0) as outer:
            outer.update()
            for _ in progress.bar(range(2), progress=False, desc="sample sr32", unit="batch"):
                clock[0] += 60
            outer.update()
    lines = [part for chunk in screen.getvalue().split("\n") for part in chunk.split("\r")]
    assert [line for line in lines if line.startswith("sample sr32")], screen.getvalue()
    assert not [line for line in lines if "sample sr32" in line and not line.startswith("sample sr32")]


def test_the_rate_leaves_out_the_first_update_and_the_loss_prints_no_line(capsys, monkeypatch):
    """A first batch of 10 minutes (one-time costs), then 30 s a batch: from the second line on
    the time left is at 30 s a batch; set_postfix (the loss) in a batch job waits for the next
    line."""
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    with progress.bar(total=10, progress=False, desc="train resnet10t", unit="batch") as shown:
        for step in range(4):
            clock[0] += 600 if step == 0 else 30
            shown.update()
            shown.set_postfix(loss="1.000")
    assert capsys.readouterr().out.splitlines() == [
        "train resnet10t: 1/10 batch [10:00 elapsed, 1:30:00 left, 600.00s/batch]",
        "train resnet10t: 3/10 batch [11:00 elapsed, 03:30 left, 30.00s/batch, loss=1.000]",
        "train resnet10t: 4/10 batch [11:30 elapsed, 03:00 left, 30.00s/batch, loss=1.000]"]
