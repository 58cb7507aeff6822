//! First-deploy fan-out: who fetches a blob no node holds yet, and who
//! follows whom.
//!
//! When a new image rolls out, every node misses the same digests at the
//! same moment, before any node's ingest exists. For each digest one node
//! decides: the node whose id is closest (Kademlia distance) to the digest's
//! record key, among this node and the peers in its routing table. Every
//! node that misses asks it over the P2P connection ([`PROTOCOL`]). The
//! first asker is told to fetch the blob itself (its peermirror answers 404,
//! its containerd goes upstream and writes an ingest); later askers are told
//! to follow a node that is already fetching, whose in-flight ingest they
//! stream. Each source takes at most `max_followers` followers, so the
//! followers form a tree, not a star: followers are ingests too and take
//! followers of their own.
//!
//! A follower that gets nothing from its source says so in its next ask
//! (`failed`): a failed leader ends the digest's entry (the next asker
//! leads), a failed follower leaves the tree. Only a member that follows
//! that source is believed: a peer cannot unseat a leader it does not
//! follow. A leader that holds the blob (it announces it in the DHT) says
//! so (`done`), which ends the entry too: later misses of the digest are
//! not sent to a fetch that is over.
//!
//! Entries expire `lease` after they were last touched. There are at most
//! [`MAX_ENTRIES`], and one asker leads at most [`MAX_LED_PER_ASKER`] of
//! them; when the board is full, a new entry takes the place of the oldest
//! one that nobody follows, so asks for made-up digests cannot push out a
//! fan-out that is under way.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What identifies a node: the libp2p peer id in the daemon, anything
/// small in tests and the simulator. Written as text in [`Ask`] and
/// [`Reply`].
pub trait NodeId: Copy + Eq + Hash + Display + FromStr + std::fmt::Debug {}

impl<T: Copy + Eq + Hash + Display + FromStr + std::fmt::Debug> NodeId for T {}

/// The request-response protocol of the fan-out.
pub const PROTOCOL: &str = "/peermirror/fanout/1.0.0";

/// Most digests tracked at once.
pub const MAX_ENTRIES: usize = 4096;

/// Most entries one asker leads at once: a node that misses more digests
/// of this rendezvous at one moment is refused (it goes upstream without
/// the fan-out).
pub const MAX_LED_PER_ASKER: usize = 256;

/// "I miss this digest."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// `sha256:<hex>`.
    pub digest: String,
    /// A source (peer id) this node was told to follow and that did not
    /// deliver.
    pub failed: Option<String>,
    /// The asker led the digest's fetch and now holds the blob: the entry
    /// has done its work (new askers find the blob in the DHT).
    #[serde(default)]
    pub done: bool,
    /// The asker's containerd is not going to fetch the blob (the request
    /// came from another host, or measures): place it behind a fetch under
    /// way, never as a leader, and make no entry for it.
    #[serde(default)]
    pub follow_only: bool,
}

/// What the asker is to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Fetch it yourself: nobody else is fetching it.
    Lead,
    /// Stream it from this peer's in-flight ingest.
    Follow { peer: String },
    /// The digest is malformed or the asker cannot be placed.
    Refused,
}

#[derive(Debug, Clone)]
struct Member<P> {
    peer: P,
    /// Whom it follows (`None`: the leader).
    source: Option<P>,
    followers: usize,
}

#[derive(Debug)]
struct Tree<P> {
    /// The leader first, then the followers in the order they joined.
    members: Vec<Member<P>>,
    touched: Instant,
}

impl<P: NodeId> Tree<P> {
    fn position(&self, peer: &P) -> Option<usize> {
        self.members.iter().position(|m| &m.peer == peer)
    }

    fn remove(&mut self, peer: &P) {
        if let Some(i) = self.position(peer) {
            let gone = self.members.remove(i);
            if let Some(source) = gone.source
                && let Some(s) = self.members.iter_mut().find(|m| m.peer == source)
            {
                s.followers = s.followers.saturating_sub(1);
            }
        }
    }
}

/// The rendezvous state of one node: one tree per digest it decides for.
/// A state machine: each [`Board::assign`] takes an ask, its asker and the
/// time, and returns the reply; it does no I/O.
#[derive(Debug)]
pub struct Board<P> {
    trees: HashMap<String, Tree<P>>,
    max_followers: usize,
    lease: Duration,
}

impl<P: NodeId> Board<P> {
    pub fn new(max_followers: usize, lease: Duration) -> Board<P> {
        Board {
            trees: HashMap::new(),
            max_followers: max_followers.max(1),
            lease,
        }
    }

    /// Digests tracked now.
    pub fn len(&self) -> usize {
        self.trees.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }

    /// Places `asker` for `ask.digest`.
    pub fn assign(&mut self, asker: P, ask: &Ask, now: Instant) -> Reply {
        if ask.digest.parse::<peermirror_oci::Digest>().is_err() {
            return Reply::Refused;
        }
        self.expire(now);
        if ask.done {
            if self
                .trees
                .get(&ask.digest)
                .and_then(|t| t.members.first())
                .is_some_and(|leader| leader.peer == asker)
            {
                tracing::debug!(digest = %ask.digest, leader = %asker, "fan-out fetch done");
                self.trees.remove(&ask.digest);
            }
            return Reply::Refused;
        }
        let failed = ask.failed.as_deref().and_then(|f| f.parse::<P>().ok());
        // Only the asker's own source can be reported as failed.
        let followed = self
            .trees
            .get(&ask.digest)
            .and_then(|t| t.position(&asker).map(|i| t.members[i].source));
        if let Some(failed) = failed
            && followed == Some(Some(failed))
            && let Some(tree) = self.trees.get_mut(&ask.digest)
        {
            if tree.members.first().is_some_and(|m| m.peer == failed) {
                tracing::info!(digest = %ask.digest, leader = %failed, "fan-out leader did not deliver; the next asker leads");
                self.trees.remove(&ask.digest);
            } else {
                tree.remove(&failed);
            }
        }
        if !self.trees.contains_key(&ask.digest) {
            if ask.follow_only {
                return Reply::Refused;
            }
            // The asker would lead a new entry.
            let led = self
                .trees
                .values()
                .filter(|t| t.members.first().is_some_and(|m| m.peer == asker))
                .count();
            if led >= MAX_LED_PER_ASKER {
                return Reply::Refused;
            }
            if self.trees.len() >= MAX_ENTRIES {
                let unfollowed = self
                    .trees
                    .iter()
                    .filter(|(_, t)| t.members.len() <= 1)
                    .min_by_key(|(_, t)| t.touched)
                    .map(|(k, _)| k.clone());
                let Some(k) = unfollowed else {
                    return Reply::Refused;
                };
                self.trees.remove(&k);
            }
        }
        let max = self.max_followers;
        let tree = self
            .trees
            .entry(ask.digest.clone())
            .or_insert_with(|| Tree {
                members: Vec::new(),
                touched: now,
            });
        tree.touched = now;
        if let Some(i) = tree.position(&asker) {
            match tree.members[i].source {
                None => return Reply::Lead,
                // Its source failed and was removed: place it again.
                Some(s) if tree.position(&s).is_none() || failed == Some(s) => tree.remove(&asker),
                Some(s) => {
                    return Reply::Follow {
                        peer: s.to_string(),
                    };
                }
            }
        }
        if tree.members.is_empty() {
            tree.members.push(Member {
                peer: asker,
                source: None,
                followers: 0,
            });
            return Reply::Lead;
        }
        // The earliest member with room: the leader first, then its
        // followers, breadth first.
        let Some(source) = tree
            .members
            .iter_mut()
            .find(|m| m.followers < max && Some(m.peer) != failed)
        else {
            return Reply::Refused;
        };
        source.followers += 1;
        let source = source.peer;
        tree.members.push(Member {
            peer: asker,
            source: Some(source),
            followers: 0,
        });
        Reply::Follow {
            peer: source.to_string(),
        }
    }

    fn expire(&mut self, now: Instant) {
        let lease = self.lease;
        self.trees
            .retain(|_, t| now.saturating_duration_since(t.touched) < lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node ids in these tests.
    type PeerId = u32;

    /// Distinct ids, as many as asked.
    fn ids<const N: usize>() -> [PeerId; N] {
        std::array::from_fn(|i| i as PeerId + 1)
    }

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn ask(failed: Option<PeerId>) -> Ask {
        Ask {
            digest: D.to_string(),
            failed: failed.map(|p| p.to_string()),
            done: false,
            follow_only: false,
        }
    }

    fn follows(r: &Reply) -> PeerId {
        match r {
            Reply::Follow { peer } => peer.parse().expect("peer id"),
            other => panic!("expected a follow, got {other:?}"),
        }
    }

    #[test]
    fn first_asker_leads_and_followers_form_a_tree() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(2, Duration::from_secs(60));
        let peers: Vec<PeerId> = ids::<7>().to_vec();
        assert_eq!(board.assign(peers[0], &ask(None), now), Reply::Lead);
        // The leader asking again (a retry of its containerd) still leads.
        assert_eq!(board.assign(peers[0], &ask(None), now), Reply::Lead);
        let sources: Vec<PeerId> = peers[1..]
            .iter()
            .map(|p| follows(&board.assign(*p, &ask(None), now)))
            .collect();
        // Two each: the leader, then its first two followers.
        assert_eq!(
            sources,
            [peers[0], peers[0], peers[1], peers[1], peers[2], peers[2]]
        );
        // Asking again gives the same source.
        assert_eq!(follows(&board.assign(peers[3], &ask(None), now)), peers[1]);
    }

    #[test]
    fn a_failed_leader_hands_the_lead_to_the_next_asker() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(4, Duration::from_secs(60));
        let [a, b, c] = ids();
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        assert_eq!(follows(&board.assign(c, &ask(None), now)), a);
        assert_eq!(board.assign(b, &ask(Some(a)), now), Reply::Lead);
        // C reports the old leader too: that must not unseat B.
        assert_eq!(follows(&board.assign(c, &ask(Some(a)), now)), b);
    }

    #[test]
    fn a_failed_follower_leaves_the_tree_and_its_followers_are_placed_again() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(1, Duration::from_secs(60));
        let [a, b, c] = ids();
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        assert_eq!(follows(&board.assign(c, &ask(None), now)), b);
        // B is gone: the leader has room again.
        assert_eq!(follows(&board.assign(c, &ask(Some(b)), now)), a);
    }

    #[test]
    fn entries_expire_and_are_bounded_and_bad_digests_are_refused() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(4, Duration::from_secs(10));
        let [a, b] = ids();
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(
            board.assign(b, &ask(None), now + Duration::from_secs(11)),
            Reply::Lead
        );
        let bad = Ask {
            digest: "../etc/passwd".into(),
            failed: None,
            done: false,
            follow_only: false,
        };
        assert_eq!(board.assign(a, &bad, now), Reply::Refused);
        let later = now + Duration::from_secs(11);
        for i in 0..(MAX_ENTRIES + 10) {
            let digest = digest(1000 + i);
            // Askers enough that none reaches its own bound.
            let asker = 100 + (i / MAX_LED_PER_ASKER) as PeerId;
            let reply = board.assign(
                asker,
                &Ask {
                    digest,
                    failed: None,
                    done: false,
                    follow_only: false,
                },
                later,
            );
            assert_eq!(reply, Reply::Lead);
        }
        assert_eq!(board.len(), MAX_ENTRIES);
    }

    fn digest(i: usize) -> String {
        format!("sha256:{i:064x}")
    }

    fn lead(board: &mut Board<PeerId>, asker: PeerId, digest: String, now: Instant) -> Reply {
        let ask = Ask {
            digest,
            failed: None,
            done: false,
            follow_only: false,
        };
        board.assign(asker, &ask, now)
    }

    #[test]
    fn an_asker_that_will_not_fetch_follows_but_never_leads() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(4, Duration::from_secs(60));
        let [a, x] = ids();
        let follow_only = Ask {
            follow_only: true,
            ..ask(None)
        };
        // Nothing under way: no entry, and the next real miss leads.
        assert_eq!(board.assign(x, &follow_only, now), Reply::Refused);
        assert!(board.is_empty());
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        // A fetch under way: it follows.
        assert_eq!(follows(&board.assign(x, &follow_only, now)), a);
    }

    #[test]
    fn only_a_follower_of_a_source_can_report_it_failed() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(1, Duration::from_secs(60));
        let [a, b, c, x] = ids();
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        // X follows nobody: its reports of the leader and of B change
        // nothing, and it is placed as anyone else (behind B).
        assert_eq!(follows(&board.assign(x, &ask(Some(a)), now)), b);
        assert_eq!(follows(&board.assign(c, &ask(Some(b)), now)), x);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        // B follows A: its report is believed, and B leads.
        assert_eq!(board.assign(b, &ask(Some(a)), now), Reply::Lead);
    }

    #[test]
    fn one_asker_leads_a_bounded_number_of_entries_and_cannot_push_out_a_fan_out() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(4, Duration::from_secs(60));
        // A real fan-out: a leads, b follows.
        let (a, b) = (1, 2);
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        // One asker asking for made-up digests is refused past its bound.
        let flooder = 3;
        for i in 0..MAX_LED_PER_ASKER {
            assert_eq!(
                lead(&mut board, flooder, digest(1000 + i), now),
                Reply::Lead
            );
        }
        assert_eq!(lead(&mut board, flooder, digest(5000), now), Reply::Refused);
        // Many askers fill the board and keep asking: the fan-out under
        // way stays, and its next asker follows it.
        for i in 0..(2 * MAX_ENTRIES) {
            let asker = 10 + (i / MAX_LED_PER_ASKER) as PeerId;
            lead(
                &mut board,
                asker,
                digest(10_000 + i),
                now + Duration::from_millis(1),
            );
        }
        assert_eq!(board.len(), MAX_ENTRIES);
        assert_eq!(follows(&board.assign(4, &ask(None), now)), a);
    }

    #[test]
    fn a_leader_that_is_done_ends_the_entry_and_only_the_leader_can() {
        let now = Instant::now();
        let mut board = Board::<PeerId>::new(4, Duration::from_secs(60));
        let [a, b, c] = ids();
        assert_eq!(board.assign(a, &ask(None), now), Reply::Lead);
        assert_eq!(follows(&board.assign(b, &ask(None), now)), a);
        let done = Ask {
            done: true,
            ..ask(None)
        };
        // A follower's "done" changes nothing.
        assert_eq!(board.assign(b, &done, now), Reply::Refused);
        assert_eq!(follows(&board.assign(c, &ask(None), now)), a);
        assert_eq!(board.assign(a, &done, now), Reply::Refused);
        assert!(board.is_empty());
        // The next miss of the digest is a fetch of its own.
        assert_eq!(board.assign(c, &ask(None), now), Reply::Lead);
    }
}
