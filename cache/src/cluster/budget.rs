//! The cluster's byte budget split over its members (issue 16, "Budget"):
//! `max_size` is the cluster's, each member enforces its share on its own
//! disk with the store's LRU eviction, so the members' sum stays within it.
//! A member's own cap (`member_max_size`, its volume's size in a cluster the
//! operator runs) bounds its share when the budget is larger or unset.

use crate::store::Store;

use super::Membership;

/// A member's budget in bytes: its share of a cluster budget of
/// `cluster_max` bytes over `members` members in its view, `cluster_max /
/// members` rounded down (so the shares never add up to more), at least 1
/// byte, and at most its own cap `member_max`. `None` only when both are
/// unset (unlimited). An empty view (a member not yet ready, before it sees
/// anyone) counts as one member: the only one it knows.
pub fn share(cluster_max: Option<u64>, members: usize, member_max: Option<u64>) -> Option<u64> {
    let share = cluster_max.map(|max| (max / members.max(1) as u64).max(1));
    match (share, member_max) {
        (Some(s), Some(cap)) => Some(s.min(cap)),
        (s, cap) => s.or(cap),
    }
}

/// Sets `store`'s budget to this member's [`share`] of `cluster_max` in
/// `membership`'s current view (capped at `member_max`), now, and again on
/// every view change, in a task that ends when the membership can no longer
/// change (a fixed one: at once). `None` (no task, the budget untouched)
/// when there is neither a cluster budget nor a member cap.
pub fn spawn(
    store: Store,
    cluster_max: Option<u64>,
    member_max: Option<u64>,
    membership: &Membership,
) -> Option<tokio::task::JoinHandle<()>> {
    if cluster_max.is_none() && member_max.is_none() {
        return None;
    }
    let mut changes = membership.changes();
    let apply = move |store: &Store, members: usize| {
        let max = share(cluster_max, members, member_max);
        if store.limits().max_size != max {
            tracing::info!(
                members,
                max_bytes = max.unwrap_or(0),
                "store budget: this member's share of the cluster's"
            );
            store.set_max_size(max);
        }
    };
    apply(&store, changes.borrow_and_update().len());
    Some(tokio::spawn(async move {
        // Errs once the view's sender is gone: a fixed membership drops it
        // at once, its first view is its only one.
        while changes.changed().await.is_ok() {
            let members = changes.borrow_and_update().len();
            apply(&store, members);
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::cluster::{Member, View};
    use crate::store::Limits;

    #[test]
    fn shares_are_the_budget_over_the_members_rounded_down() {
        assert_eq!(share(Some(1000), 1, None), Some(1000));
        assert_eq!(share(Some(1000), 3, None), Some(333));
        assert_eq!(share(Some(1000), 4, None), Some(250));
        assert_eq!(share(Some(1000), 0, None), Some(1000), "an empty view");
        assert_eq!(share(Some(2), 3, None), Some(1), "never a zero budget");
        assert_eq!(share(None, 3, None), None);
        // Never more than the budget in sum.
        for n in 1..=16 {
            assert!(share(Some(1_000_003), n, None).unwrap() * n as u64 <= 1_000_003);
        }
    }

    #[test]
    fn a_member_cap_bounds_the_share() {
        // The operator's default: no cluster budget, each member its volume.
        assert_eq!(share(None, 3, Some(900)), Some(900));
        // A budget above what the members' disks hold: each its disk.
        assert_eq!(share(Some(10_000), 2, Some(900)), Some(900));
        // Below: the share.
        assert_eq!(share(Some(1000), 4, Some(900)), Some(250));
        assert_eq!(share(Some(1000), 1, Some(900)), Some(900));
    }

    fn view(n: usize) -> View {
        (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                url: format!("http://127.0.0.1:{}", 5000 + i).parse().unwrap(),
            })
            .collect()
    }

    async fn store(max: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_size: Some(max),
            ..Limits::default()
        };
        let s = Store::open_with(dir.path(), limits, Arc::default())
            .await
            .unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn the_share_follows_the_view() {
        let (_dir, store) = store(900).await;
        let (tx, rx) = watch::channel(view(3));
        let task = spawn(
            store.clone(),
            Some(900),
            None,
            &Membership::new("m0".into(), rx),
        )
        .unwrap();
        assert_eq!(store.limits().max_size, Some(300), "set before serving");
        for (n, want) in [(2, 450), (4, 225), (1, 900)] {
            tx.send(view(n)).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while store.limits().max_size != Some(want) && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            assert_eq!(store.limits().max_size, Some(want), "{n} members");
        }
        drop(tx);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("ends with its membership")
            .unwrap();
    }

    #[tokio::test]
    async fn a_fixed_view_sets_the_share_once() {
        let (_dir, store) = store(1000).await;
        let fixed = Membership::fixed("m0".into(), view(4).to_vec());
        let task = spawn(store.clone(), Some(1000), None, &fixed).unwrap();
        assert_eq!(store.limits().max_size, Some(250));
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("a fixed membership's task ends at once")
            .unwrap();
        assert_eq!(store.limits().max_size, Some(250));
        assert!(spawn(store.clone(), None, None, &fixed).is_none());
        spawn(store.clone(), None, Some(700), &fixed);
        assert_eq!(store.limits().max_size, Some(700), "the cap alone");
    }
}
