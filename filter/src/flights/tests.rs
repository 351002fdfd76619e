//! One worker's bookkeeping: who leads, who waits, what the root must send, and the
//! bounds.

use wasm_bindgen_test::wasm_bindgen_test;

use super::*;
use crate::cache;

const T: u64 = 1_000_000_000;
const TIMEOUT: Duration = Duration::from_millis(1000);

fn check(tag: u8) -> Check {
    Check {
        message: vec![tag],
        metadata: Vec::new(),
        timeout: TIMEOUT,
    }
}

fn pending(digest: Digest) -> Pending {
    Pending {
        digest: Some(digest),
        workload_expiry: None,
    }
}

fn join(flights: &mut Flights, token: &str, context: u32, now_ms: u64) -> Joined {
    let d = cache::digest(token);
    flights.join(d, context, now_ms, pending(d), check(context as u8))
}

fn contexts(waiters: &[Waiter]) -> Vec<u32> {
    waiters.iter().map(|w| w.context).collect()
}

#[wasm_bindgen_test(unsupported = test)]
fn the_first_miss_leads_and_later_ones_wait_until_it_settles() {
    let mut f = Flights::default();
    assert_eq!(join(&mut f, "a", 1, T), Joined::Lead(check(1)));
    assert_eq!(join(&mut f, "a", 2, T + 10), Joined::Wait);
    assert_eq!(join(&mut f, "a", 3, T + 20), Joined::Wait);
    assert_eq!(join(&mut f, "b", 4, T + 20), Joined::Lead(check(4)));
    let a = cache::digest("a");
    assert_eq!(contexts(&f.settle(&a, 1)), [2, 3]);
    assert_eq!(
        join(&mut f, "a", 5, T + 30),
        Joined::Lead(check(5)),
        "a new flight"
    );
    assert!(!f.arm(), "nothing for the root");
}

#[wasm_bindgen_test(unsupported = test)]
fn past_the_waiter_cap_a_miss_sends_its_own_check() {
    let mut f = Flights::default();
    join(&mut f, "a", 0, T);
    for context in 1..=MAX_WAITERS as u32 {
        assert_eq!(join(&mut f, "a", context, T), Joined::Wait);
    }
    let over = MAX_WAITERS as u32 + 1;
    assert_eq!(join(&mut f, "a", over, T), Joined::Alone(check(over as u8)));
    let a = cache::digest("a");
    assert_eq!(f.settle(&a, over), [], "alone answers itself only");
    assert_eq!(f.settle(&a, 0).len(), MAX_WAITERS);
}

#[wasm_bindgen_test(unsupported = test)]
fn past_the_token_cap_a_miss_sends_its_own_check() {
    let mut f = Flights::default();
    for i in 0..MAX_TOKENS as u32 {
        assert!(matches!(
            join(&mut f, &format!("t{i}"), i, T),
            Joined::Lead(_)
        ));
    }
    assert!(matches!(
        join(&mut f, "one more", 9999, T),
        Joined::Alone(_)
    ));
    assert_eq!(
        join(&mut f, "t0", 10_000, T),
        Joined::Wait,
        "known tokens still coalesce"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_waiter_that_went_away_needs_no_answer() {
    let mut f = Flights::default();
    join(&mut f, "a", 1, T);
    join(&mut f, "a", 2, T);
    join(&mut f, "a", 3, T);
    let a = cache::digest("a");
    f.leave(&a, 2);
    assert_eq!(contexts(&f.settle(&a, 1)), [3]);
}

#[wasm_bindgen_test(unsupported = test)]
fn when_the_first_request_goes_away_the_root_asks_for_its_waiters_within_their_time() {
    let mut f = Flights::default();
    join(&mut f, "a", 1, T);
    join(&mut f, "a", 2, T + 100);
    join(&mut f, "a", 3, T + 600);
    let a = cache::digest("a");
    f.abandon(&a, 2);
    assert!(!f.arm(), "only the leader's going matters");
    f.abandon(&a, 1);
    assert!(f.arm());
    assert!(!f.arm(), "armed once");
    assert_eq!(
        join(&mut f, "a", 4, T + 700),
        Joined::Wait,
        "joins the root's ask"
    );
    // At T + 1200 waiter 2's own second has passed (T + 1100): it is answered as a
    // failed Check; 3's Check is sent with the 400 ms it has left.
    let jobs = f.take_jobs(T + 1200);
    let [
        Job::Ask {
            digest,
            expired,
            check: Some(sent),
        },
    ] = jobs.as_slice()
    else {
        panic!("{jobs:?}")
    };
    assert_eq!(*digest, a);
    assert_eq!(contexts(expired), [2]);
    assert_eq!(
        *sent,
        Check {
            timeout: Duration::from_millis(400),
            ..check(3)
        }
    );
    assert_eq!(f.settle(&a, 1), [], "the old leader's reply answers no one");
    assert_eq!(contexts(&f.settle_root(&a)), [3, 4]);
}

#[wasm_bindgen_test(unsupported = test)]
fn a_leader_gone_with_no_one_waiting_leaves_nothing_behind() {
    let mut f = Flights::default();
    join(&mut f, "a", 1, T);
    f.abandon(&cache::digest("a"), 1);
    assert!(!f.arm());
    assert!(matches!(join(&mut f, "a", 2, T), Joined::Lead(_)));
}

#[wasm_bindgen_test(unsupported = test)]
fn waiters_all_gone_before_the_tick_need_no_check() {
    let mut f = Flights::default();
    join(&mut f, "a", 1, T);
    join(&mut f, "a", 2, T);
    let a = cache::digest("a");
    f.abandon(&a, 1);
    f.leave(&a, 2);
    let jobs = f.take_jobs(T + 10);
    assert!(
        matches!(jobs.as_slice(), [Job::Ask { expired, check: None, .. }] if expired.is_empty()),
        "{jobs:?}"
    );
    assert!(matches!(join(&mut f, "a", 3, T + 20), Joined::Lead(_)));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_check_never_answered_is_asked_again_by_the_next_miss() {
    let mut f = Flights::default();
    join(&mut f, "a", 1, T);
    join(&mut f, "a", 2, T);
    let lost = T + 2001;
    assert!(matches!(join(&mut f, "a", 3, lost), Joined::Lead(_)));
    let a = cache::digest("a");
    assert_eq!(f.settle(&a, 1), []);
    assert_eq!(
        contexts(&f.settle(&a, 3)),
        [2],
        "its reply answers the old waiter too"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn one_refresh_per_token_and_at_most_max_refreshes_per_worker() {
    let mut f = Flights::default();
    let mut built = 0;
    let mut refresh = |f: &mut Flights, token: &str, now_ms: u64| {
        let d = cache::digest(token);
        f.refresh(d, now_ms, TIMEOUT, || {
            built += 1;
            (pending(d), check(0))
        })
    };
    assert!(refresh(&mut f, "a", T));
    assert!(!refresh(&mut f, "a", T + 10), "one in flight for a");
    for i in 1..MAX_REFRESHES {
        assert!(refresh(&mut f, &format!("t{i}"), T));
    }
    assert!(!refresh(&mut f, "one more", T), "the worker's bound");
    f.refresh_done(&cache::digest("t1"));
    assert!(refresh(&mut f, "one more", T));
    assert!(
        refresh(&mut f, "a", T + 2001),
        "a refresh never answered counts as lost"
    );
    assert_eq!(
        built,
        MAX_REFRESHES + 2,
        "a Check is built only when queued"
    );
    assert!(f.arm());
    assert_eq!(f.take_jobs(T + 2001).len(), MAX_REFRESHES + 2);
}

#[wasm_bindgen_test(unsupported = test)]
fn the_root_remembers_what_each_of_its_calls_is_for() {
    let mut f = Flights::default();
    let a = cache::digest("a");
    f.sent(7, Call::Miss(a));
    assert_eq!(f.answered(8), None);
    assert_eq!(f.answered(7), Some(Call::Miss(a)));
    assert_eq!(f.answered(7), None);
}
