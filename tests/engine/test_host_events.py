"""What a host listens to and how it stops a run: caching progress comes as its own event kind (no host
parses "caching ..." info strings), and a host's own stop exception, passed to train(), ends the run
"stopped" with a checkpoint kept, where an exception the host did not name is an error."""

import pytest

from engine.events import FunctionCallback
from engine.models import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


class HostCancel(Exception):
    """What a host raises from a callback when its user presses Cancel (ComfyUI: InterruptProcessingException)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pattern_dataset(tmp_path_factory.mktemp("events"), n=2)


def test_caching_progress_is_its_own_event(data, tmp_path):
    events = []
    train(quick_config(data, tmp_path, max_train_steps=1, batch_size=1), tiny_sd1(),
          callbacks=[FunctionCallback(events.append)])
    caching = [e for e in events if e.kind == "caching"]
    assert caching and caching[-1].step == caching[-1].total_steps > 0
    assert caching[-1].message == f"caching {caching[-1].step}/{caching[-1].total_steps}"
    assert not any(e.kind == "info" and e.message.startswith("caching") for e in events)
    kinds = [e.kind for e in events]
    assert kinds.index("caching") < kinds.index("start")


def _cancel_at_step(n):
    def on_event(event):
        if event.kind == "step" and event.step == n:
            raise HostCancel()
    return FunctionCallback(on_event)


def test_a_hosts_stop_exception_ends_the_run_stopped_with_a_checkpoint(data, tmp_path):
    events = []
    with pytest.raises(HostCancel):
        train(quick_config(data, tmp_path, max_train_steps=4), tiny_sd1(),
              callbacks=[_cancel_at_step(2), FunctionCallback(events.append)], stop_exceptions=(HostCancel,))
    stopped = [e for e in events if e.kind == "stopped"]
    assert len(stopped) == 1 and stopped[0].step == 2 and stopped[0].path
    assert stopped[0].message == "stopped at step 2; resume with resume_from_checkpoint: latest"
    assert not any(e.kind == "error" for e in events)


def test_an_exception_the_host_did_not_name_is_an_error(data, tmp_path):
    events = []
    with pytest.raises(HostCancel):
        train(quick_config(data, tmp_path, max_train_steps=4), tiny_sd1(),
              callbacks=[_cancel_at_step(2), FunctionCallback(events.append)])
    assert [e.kind for e in events if e.kind in ("stopped", "error")] == ["error"]
    assert next(e for e in events if e.kind == "error").path  # the checkpoint is kept all the same
