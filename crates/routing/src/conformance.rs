//! The behaviour every [`Router`] must have, run against the libp2p router
//! (a node on its own, over real sockets) and against the in-memory twin,
//! so that the twin can stand in for the real router in the mirror's and
//! the sync task's tests.

use std::time::Duration;

use futures::StreamExt;

use super::{FirstRound, Round, Router};

const SETTLE: Duration = Duration::from_secs(10);

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh router (no bootstrap peers expected) reports its first round as
/// the keys are handed over and stored, and counts what it announces.
pub async fn announces(router: &dyn Router) {
    assert_eq!(router.status().first_round, FirstRound::Waiting);
    assert!(
        !router.status().waiting_for().is_empty(),
        "ready before its first round"
    );
    let first: Vec<String> = (0..5).map(|i| format!("sha256:{i:064x}")).collect();
    router
        .advertise(first.clone(), Round::Initial)
        .await
        .expect("advertise");
    eventually("the first round is stored", || {
        router.status().first_round == FirstRound::Stored
    })
    .await;
    assert!(router.status().waiting_for().is_empty());
    assert_eq!(router.status().advertised_keys, 5);
    // Keys already announced are not counted twice; later ones add up.
    router
        .advertise(
            vec![first[0].clone(), "docker.io/library/x:1".into()],
            Round::Update,
        )
        .await
        .expect("advertise");
    eventually("six keys", || router.status().advertised_keys == 6).await;
    router
        .withdraw(first[..2].to_vec())
        .await
        .expect("withdraw");
    eventually("four keys", || router.status().advertised_keys == 4).await;
    assert_eq!(router.status().first_round, FirstRound::Stored);
    let mut watch = router.watch_status();
    assert_eq!(watch.borrow_and_update().advertised_keys, 4);
}

/// A lookup of a key nobody announced ends, empty, and soon.
pub async fn misses_end(router: &dyn Router) {
    let found: Vec<_> = tokio::time::timeout(SETTLE, router.lookup("sha256:nobody").collect())
        .await
        .expect("a lookup of an unknown key ends");
    assert!(found.is_empty(), "{found:?}");
}
