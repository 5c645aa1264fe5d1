//! Members this process could not reach lately, skipped for a while so that
//! every request for their keys does not wait for a connect to fail again.
//!
//! Process-local by design (issue 16, "Failures"): each member learns by
//! itself that a peer is gone, and retries it once [`DOWN_FOR`] has passed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Member;

/// How long a member stays skipped after a failed request to it.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

/// Members marked down, each until an instant.
#[derive(Debug, Default)]
pub struct DownList {
    until: Mutex<HashMap<String, Instant>>,
}

impl DownList {
    /// Marks `member` down from `now` for [`DOWN_FOR`].
    pub fn mark(&self, member: &str, now: Instant) {
        let mut until = self.until.lock().expect("down list lock");
        // Forget members whose time is up, so the map stays as small as the
        // set of members down at once.
        until.retain(|_, u| is_down(Some(*u), now));
        until.insert(member.to_owned(), now + DOWN_FOR);
    }

    /// Whether `member` is marked down at `now`.
    pub fn is_down(&self, member: &str, now: Instant) -> bool {
        let until = self.until.lock().expect("down list lock");
        is_down(until.get(member).copied(), now)
    }

    /// `ranked` without the members down at `now`, in the same order.
    pub fn alive(&self, ranked: Vec<&Member>, now: Instant) -> Vec<Member> {
        let until = self.until.lock().expect("down list lock");
        ranked
            .into_iter()
            .filter(|m| !is_down(until.get(&m.name).copied(), now))
            .cloned()
            .collect()
    }
}

/// Whether a member marked down until `until` (never, for `None`) is still
/// down at `now`.
pub fn is_down(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|u| now < u)
}

/// The members to ask, in order, before serving a key here: those ranked
/// ahead of `me` in `order` (a ranking without the members down). Empty when
/// `me` comes first: this process serves the key itself. When `me` is not in
/// `order` at all (not in its own view, as a pod not yet ready), every member
/// is asked before serving here.
pub fn ahead_of<'o>(order: &'o [Member], me: &str) -> &'o [Member] {
    let mine = order
        .iter()
        .position(|m| m.name == me)
        .unwrap_or(order.len());
    &order[..mine]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            url: format!("http://{name}:5000").parse().unwrap(),
        }
    }

    #[test]
    fn a_member_is_down_for_ten_seconds_then_tried_again() {
        let list = DownList::default();
        let t0 = Instant::now();
        assert!(!list.is_down("a", t0));
        list.mark("a", t0);
        assert!(list.is_down("a", t0));
        assert!(list.is_down("a", t0 + DOWN_FOR - Duration::from_millis(1)));
        assert!(!list.is_down("a", t0 + DOWN_FOR));
        assert!(!list.is_down("b", t0));
        // Marking again starts the period anew.
        list.mark("a", t0 + DOWN_FOR);
        assert!(list.is_down("a", t0 + DOWN_FOR + Duration::from_secs(5)));
    }

    #[test]
    fn expired_marks_are_forgotten() {
        let list = DownList::default();
        let t0 = Instant::now();
        list.mark("a", t0);
        list.mark("b", t0 + DOWN_FOR);
        assert_eq!(list.until.lock().unwrap().len(), 1);
    }

    #[test]
    fn alive_keeps_the_ranking_order_minus_members_down() {
        let list = DownList::default();
        let (a, b, c) = (member("a"), member("b"), member("c"));
        let t0 = Instant::now();
        list.mark("b", t0);
        let names = |ms: Vec<Member>| ms.into_iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(names(list.alive(vec![&c, &b, &a], t0)), ["c", "a"]);
        assert_eq!(
            names(list.alive(vec![&c, &b, &a], t0 + DOWN_FOR)),
            ["c", "b", "a"]
        );
    }

    #[test]
    fn ahead_of_me_are_the_members_to_ask_first() {
        let order = [member("c"), member("a"), member("b")];
        let names = |ms: &[Member]| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert!(ahead_of(&order, "c").is_empty());
        assert_eq!(names(ahead_of(&order, "a")), ["c"]);
        assert_eq!(names(ahead_of(&order, "b")), ["c", "a"]);
        assert_eq!(names(ahead_of(&order, "x")), ["c", "a", "b"]);
        assert!(ahead_of(&[], "a").is_empty());
    }
}
