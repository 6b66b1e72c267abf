//! The state machine, exhaustively: the expected result of every event in every status, in one
//! table, and the messages of the transitions it refuses.

use task_core::Status::{self, Cancelled, Completed, Failed, Paused, Queued, Running, Scheduled};
use task_core::state::{ALL_EVENTS, Event, IllegalTransition, allowed_from, decide};

/// The columns of [`EXPECTED`]: every event with every combination of its flags.
///
/// The same set as [`ALL_EVENTS`], spelled out so that the table's columns are visible here
/// (a frozen task resumes to running whether or not it is due; a priority changes only while the
/// task waits, and its status stays).
const EVENTS: [Event; 16] = [
    Event::Promote,
    Event::Claim,
    Event::Complete,
    Event::Fail { retry: true },
    Event::Fail { retry: false },
    Event::Abandon { retry: true },
    Event::Abandon { retry: false },
    Event::Release,
    Event::Cancel,
    Event::Pause,
    Event::Resume {
        frozen: true,
        due: true,
    },
    Event::Resume {
        frozen: true,
        due: false,
    },
    Event::Resume {
        frozen: false,
        due: true,
    },
    Event::Resume {
        frozen: false,
        due: false,
    },
    Event::Reprioritize { frozen: true },
    Event::Reprioritize { frozen: false },
];

/// Refused: an [`IllegalTransition`].
const NO: Option<Status> = None;

/// Shorthand for an allowed move to `status`.
const fn to(status: Status) -> Option<Status> {
    Some(status)
}

/// The expected result of every event (the columns, in the order of [`EVENTS`]) in every status
/// (the rows, in the order of [`Status::ALL`]).
#[rustfmt::skip]
const EXPECTED: [(Status, [Option<Status>; 16]); 7] = [
    //           promote      claim         complete        fail+retry      fail         abandon+retry  abandon      release      cancel          pause        resume:frozen  frozen,later  due          later           reprioritize:frozen  waiting
    (Queued,    [NO,          to(Running),  NO,             NO,             NO,          NO,            NO,          NO,          to(Cancelled),  to(Paused),  NO,            NO,           NO,          NO,             to(Queued),          to(Queued)]),
    (Scheduled, [to(Queued),  NO,           NO,             NO,             NO,          NO,            NO,          NO,          to(Cancelled),  to(Paused),  NO,            NO,           NO,          NO,             to(Scheduled),       to(Scheduled)]),
    (Paused,    [NO,          NO,           NO,             NO,             NO,          NO,            NO,          NO,          to(Cancelled),  NO,          to(Running),   to(Running),  to(Queued),  to(Scheduled),  NO,                  to(Paused)]),
    (Running,   [NO,          NO,           to(Completed),  to(Scheduled),  to(Failed),  to(Queued),    to(Failed),  to(Queued),  to(Cancelled),  to(Paused),  NO,            NO,           NO,          NO,             NO,                  NO]),
    (Completed, [NO,          NO,           NO,             NO,             NO,          NO,            NO,          NO,          NO,             NO,          NO,            NO,           NO,          NO,             NO,                  NO]),
    (Failed,    [NO,          NO,           NO,             NO,             NO,          NO,            NO,          NO,          NO,             NO,          NO,            NO,           NO,          NO,             NO,                  NO]),
    (Cancelled, [NO,          NO,           NO,             NO,             NO,          NO,            NO,          NO,          NO,             NO,          NO,            NO,           NO,          NO,             NO,                  NO]),
];

#[test]
fn the_table_covers_every_status_and_every_event() {
    let rows: Vec<Status> = EXPECTED.iter().map(|(status, _)| *status).collect();
    assert_eq!(
        rows,
        Status::ALL,
        "one row per status, in the order of Status::ALL"
    );
    for event in ALL_EVENTS {
        assert!(
            EVENTS.contains(&event),
            "{event:?} of ALL_EVENTS has no column"
        );
    }
    for (index, event) in EVENTS.iter().enumerate() {
        assert!(
            !EVENTS[..index].contains(event),
            "{event:?} has two columns"
        );
    }
    let extra: Vec<Event> = EVENTS
        .into_iter()
        .filter(|e| !ALL_EVENTS.contains(e))
        .collect();
    assert_eq!(extra, [], "every column is an event of ALL_EVENTS");
}

#[test]
fn every_status_and_event_gives_the_expected_move_or_refusal() {
    let mut checked = 0;
    for (from, row) in EXPECTED {
        for (event, expected) in EVENTS.into_iter().zip(row) {
            check(from, event, expected);
            checked += 1;
        }
    }
    assert_eq!(checked, Status::ALL.len() * EVENTS.len());
}

/// Asserts what `event` does in status `from`: a move to `expected`, or (for `None`) a refusal
/// that names the status and the event and reads as a sentence.
fn check(from: Status, event: Event, expected: Option<Status>) {
    let actual = decide(from, event);
    match expected {
        Some(to) => assert_eq!(actual, Ok(to), "{event:?} from {from}"),
        None => {
            let refusal = actual.expect_err(&format!("{event:?} from {from} should be refused"));
            assert_eq!(refusal, IllegalTransition { from, event });
            check_message(&refusal);
        }
    }
}

/// The message of a refusal: "cannot <verb> a task that is <status>", and the reason wherever
/// there is one to give.
fn check_message(refusal: &IllegalTransition) {
    let message = refusal.to_string();
    let start = format!(
        "cannot {} a task that is {}",
        refusal.event.verb(),
        refusal.from
    );
    assert!(
        message.starts_with(&start),
        "`{message}` should start with `{start}`"
    );
    let reason = message[start.len()..].to_owned();
    if !reason.is_empty() {
        assert!(
            reason.starts_with(": "),
            "`{message}`: the reason follows a colon"
        );
        assert!(
            !reason.ends_with('.') && !reason.ends_with(' '),
            "`{message}`"
        );
    }
    let ends_an_attempt = matches!(
        refusal.event,
        Event::Complete | Event::Fail { .. } | Event::Abandon { .. }
    );
    if matches!(refusal.event, Event::Reprioritize { .. }) {
        assert!(
            reason.contains("only waiting tasks") && reason.contains("can be reprioritized"),
            "`{message}` should say that only waiting tasks can be reprioritized"
        );
        if refusal.from.is_terminal() {
            assert!(
                reason.contains("already finished") && reason.contains("submit a new task"),
                "`{message}` should say the task has finished and what to do"
            );
        } else {
            assert!(reason.contains("already started"), "`{message}`");
        }
    } else if refusal.from.is_terminal() {
        assert!(
            reason.contains("already finished") && reason.contains("submit a new task"),
            "`{message}` should say the task has finished and what to do"
        );
    } else if ends_an_attempt {
        assert_eq!(reason, ": only a running attempt can end", "`{message}`");
    } else if matches!(refusal.event, Event::Resume { .. }) {
        assert!(
            !reason.is_empty(),
            "`{message}` should say why it cannot resume"
        );
    }
}

#[test]
fn refusals_read_as_sentences() {
    let cases: &[(Status, Event, &str)] = &[
        (
            Completed,
            Event::Cancel,
            "cannot cancel a task that is completed: it has already finished and its status is final; submit a new task to run it again",
        ),
        (
            Failed,
            Event::Resume {
                frozen: false,
                due: true,
            },
            "cannot resume a task that is failed: it has already finished and its status is final; submit a new task to run it again",
        ),
        (
            Cancelled,
            Event::Complete,
            "cannot complete a task that is cancelled: it has already finished and its status is final; submit a new task to run it again",
        ),
        (
            Running,
            Event::Resume {
                frozen: false,
                due: true,
            },
            "cannot resume a task that is running: it is already running",
        ),
        (
            Paused,
            Event::Pause,
            "cannot pause a task that is paused: it is already paused",
        ),
        (
            Queued,
            Event::Resume {
                frozen: false,
                due: false,
            },
            "cannot resume a task that is queued: it is not paused",
        ),
        (
            Scheduled,
            Event::Resume {
                frozen: false,
                due: true,
            },
            "cannot resume a task that is scheduled: it is not paused",
        ),
        (
            Queued,
            Event::Complete,
            "cannot complete a task that is queued: only a running attempt can end",
        ),
        (
            Paused,
            Event::Fail { retry: true },
            "cannot fail a task that is paused: only a running attempt can end",
        ),
        (
            Scheduled,
            Event::Abandon { retry: false },
            "cannot recover a task that is scheduled: only a running attempt can end",
        ),
        (Running, Event::Claim, "cannot start a task that is running"),
        (
            Running,
            Event::Reprioritize { frozen: false },
            "cannot reprioritize a task that is running: it has already started; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized",
        ),
        (
            Paused,
            Event::Reprioritize { frozen: true },
            "cannot reprioritize a task that is paused: it was paused while running, so it has already started; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized",
        ),
        (
            Completed,
            Event::Reprioritize { frozen: false },
            "cannot reprioritize a task that is completed: it has already finished; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized; submit a new task to run it again at another priority",
        ),
        (
            Queued,
            Event::Promote,
            "cannot promote a task that is queued",
        ),
    ];
    for (from, event, expected) in cases {
        let refusal = decide(*from, *event).expect_err("refused");
        assert_eq!(refusal.to_string(), *expected);
    }
}

#[test]
fn terminal_statuses_allow_no_event_at_all() {
    for status in Status::ALL.into_iter().filter(|s| s.is_terminal()) {
        for event in EVENTS {
            assert!(
                decide(status, event).is_err(),
                "{event:?} from terminal {status}"
            );
        }
    }
    let terminal: Vec<Status> = Status::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect();
    assert_eq!(terminal, [Completed, Failed, Cancelled]);
}

#[test]
fn every_live_status_allows_cancel_and_some_way_forward() {
    for status in Status::ALL.into_iter().filter(|s| !s.is_terminal()) {
        assert_eq!(decide(status, Event::Cancel), Ok(Cancelled), "{status}");
        let forward = EVENTS
            .into_iter()
            .filter_map(|event| decide(status, event).ok())
            .any(|to| to != Cancelled && to != status);
        assert!(forward, "{status} has no way forward but cancel");
    }
}

#[test]
fn allowed_from_agrees_with_the_table() {
    for (column, event) in EVENTS.into_iter().enumerate() {
        let expected: Vec<Status> = EXPECTED
            .iter()
            .filter(|(_, row)| row[column].is_some())
            .map(|(status, _)| *status)
            .collect();
        assert_eq!(allowed_from(event), expected, "{event:?}");
    }
}
