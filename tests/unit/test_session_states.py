"""node.fastpath.SessionStates behaves as amqtt's transitions.Machine for every trigger sequence."""

from __future__ import annotations

import pytest
from amqtt.session import Session
from hypothesis import given
from hypothesis import strategies as st
from transitions.core import MachineError

from node.fastpath import SessionStates


def run(session: Session, triggers: list[str]) -> list[tuple[str, str, bool, bool]]:
    """After each trigger: (outcome, state, stamped connect time, stamped disconnect time)."""
    seen = []
    for trigger in triggers:
        try:
            getattr(session.transitions, trigger)()
            outcome = "ok"
        except MachineError:
            outcome = "MachineError"
        t = session.transitions
        seen.append((outcome, t.state, t.is_connected(), session.last_connect_time is not None))
        assert (session.last_disconnect_time is not None) == (t.state == "disconnected")
    return seen


@given(st.lists(st.sampled_from(["connect", "disconnect"]), max_size=12))
def test_same_states_errors_and_callbacks_as_amqtts_machine(triggers: list[str]) -> None:
    reference = Session()  # amqtt's own transitions.Machine
    slim = Session()
    slim.transitions = SessionStates(slim, slim.transitions.state)  # type: ignore[assignment]
    assert run(slim, triggers) == run(reference, triggers)


def test_a_slimmed_session_starts_new() -> None:
    session = Session()
    states = SessionStates(session, session.transitions.state)
    assert states.is_new()
    assert not states.is_connected()
    assert not states.is_disconnected()
    states.connect()
    with pytest.raises(MachineError):
        states.connect()
