//! Supervised tasks. Every long-running part of the daemon is a task in a
//! stage; a task that ends before shutdown — returning, failing or
//! panicking — is logged with its error and then either stops the daemon
//! (it exits non-zero and systemd or Kubernetes restart it) or, for a task
//! the node can work without, marks the node not ready with the reason.
//! `/healthz` fails from the moment an essential task has died.
//!
//! At shutdown the stages stop one after the other, in the order they were
//! declared (the registry port first, the status port last), each waiting
//! for its tasks to finish for at most [`STAGE_GRACE`].

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::status::Health;
use tokio_util::sync::CancellationToken;

/// How long one stage may take to stop before its tasks are aborted.
pub const STAGE_GRACE: Duration = Duration::from_secs(15);

/// What a task's early end means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The daemon cannot do its job without it: stop (and be restarted).
    Essential,
    /// The node keeps working without it, and a restart would cut every
    /// transfer in flight to bring it back: mark the node not ready.
    Auxiliary,
}

/// A task ended before it was asked to.
#[derive(Debug, thiserror::Error)]
#[error("the {task} task stopped: {reason}")]
pub struct TaskFailed {
    pub task: &'static str,
    pub reason: String,
}

struct Stage {
    name: &'static str,
    stop: CancellationToken,
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<tokio::task::Id, (&'static str, Policy)>,
}

/// A stage's handle: where its tasks are spawned, and the token that tells
/// them to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageId(usize);

pub struct Supervisor {
    stages: Vec<Stage>,
    health: Arc<Health>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor {
            stages: Vec::new(),
            health: Arc::default(),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Declares the next stage; stages stop in the order they are declared.
    pub fn stage(&mut self, name: &'static str) -> StageId {
        self.stages.push(Stage {
            name,
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
            names: HashMap::new(),
        });
        StageId(self.stages.len() - 1)
    }

    /// The token that is cancelled when `stage` stops.
    pub fn stop_token(&self, stage: StageId) -> CancellationToken {
        self.stages[stage.0].stop.clone()
    }

    /// Runs `task` in `stage`.
    pub fn spawn<F, E>(&mut self, stage: StageId, name: &'static str, policy: Policy, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let stage = &mut self.stages[stage.0];
        let handle = stage
            .tasks
            .spawn(async move { task.await.map_err(|e| e.to_string()) });
        stage.names.insert(handle.id(), (name, policy));
    }

    /// Like [`Supervisor::spawn`], for a task that cannot fail, only end.
    pub fn spawn_infallible<F>(
        &mut self,
        stage: StageId,
        name: &'static str,
        policy: Policy,
        task: F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(stage, name, policy, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Runs until `shutdown` or until an essential task dies, then stops the
    /// stages in order.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), TaskFailed> {
        let mut failure = None;
        loop {
            let ended = tokio::select! {
                _ = shutdown.cancelled() => break,
                ended = self.next_exit() => ended,
            };
            let (name, policy, reason) = ended;
            tracing::error!(task = name, %reason, "a task stopped before shutdown");
            match policy {
                Policy::Essential => {
                    let failed = TaskFailed { task: name, reason };
                    self.health.fail(failed.to_string());
                    failure = Some(failed);
                    break;
                }
                Policy::Auxiliary => self
                    .health
                    .degrade(format!("the {name} task, which stopped: {reason}")),
            }
        }
        for stage in &mut self.stages {
            stage.stop.cancel();
            let drained = tokio::time::timeout(STAGE_GRACE, async {
                while let Some(joined) = stage.tasks.join_next_with_id().await {
                    let (id, result) = match joined {
                        Ok((id, r)) => (id, r),
                        Err(e) => (e.id(), Err(join_reason(&e))),
                    };
                    if let Err(reason) = result {
                        let name = stage.names.get(&id).map_or("?", |(n, _)| n);
                        tracing::warn!(task = name, %reason, "a task failed while stopping");
                    }
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    stage = stage.name,
                    "stage did not stop in time; aborting its tasks"
                );
                stage.tasks.abort_all();
                while stage.tasks.join_next().await.is_some() {}
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// The next task to end, with what its end means.
    async fn next_exit(&mut self) -> (&'static str, Policy, String) {
        std::future::poll_fn(|cx| {
            for stage in &mut self.stages {
                if let Poll::Ready(Some(joined)) = stage.tasks.poll_join_next_with_id(cx) {
                    let (id, reason) = match joined {
                        Ok((id, Ok(()))) => (id, "it returned before shutdown".to_string()),
                        Ok((id, Err(e))) => (id, e),
                        Err(e) => (e.id(), join_reason(&e)),
                    };
                    let (name, policy) =
                        stage.names.remove(&id).unwrap_or(("?", Policy::Essential));
                    return Poll::Ready((name, policy, reason));
                }
            }
            Poll::Pending
        })
        .await
    }
}

fn join_reason(e: &tokio::task::JoinError) -> String {
    if e.is_panic() {
        "it panicked".to_string()
    } else {
        "it was cancelled".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn forever(stop: CancellationToken) -> Result<(), String> {
        stop.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_essential_task_stops_the_daemon() {
        let mut s = Supervisor::new();
        let serving = s.stage("serving");
        let status = s.stage("status");
        s.spawn(
            serving,
            "registry",
            Policy::Essential,
            forever(s.stop_token(serving)),
        );
        s.spawn(
            status,
            "metrics",
            Policy::Essential,
            forever(s.stop_token(status)),
        );
        s.spawn_infallible(serving, "sync", Policy::Essential, async {
            tokio::task::yield_now().await;
            panic!("boom");
        });
        let health = s.health();
        let err = s
            .run(CancellationToken::new())
            .await
            .expect_err("a dead task fails the run");
        assert_eq!(err.task, "sync");
        assert_eq!(err.reason, "it panicked");
        let reason = health.check().expect_err("healthz fails");
        assert!(reason.contains("sync"), "{reason}");
    }

    #[tokio::test]
    async fn an_error_or_an_early_return_is_a_failure_too() {
        let mut s = Supervisor::new();
        let st = s.stage("background");
        s.spawn(st, "router", Policy::Essential, async {
            Err::<(), _>("the swarm ended")
        });
        let err = s.run(CancellationToken::new()).await.expect_err("fails");
        assert_eq!(
            (err.task, err.reason.as_str()),
            ("router", "the swarm ended")
        );

        let mut s = Supervisor::new();
        let st = s.stage("background");
        s.spawn_infallible(st, "gauges", Policy::Essential, async {});
        let err = s.run(CancellationToken::new()).await.expect_err("fails");
        assert_eq!(err.reason, "it returned before shutdown");
    }

    #[tokio::test]
    async fn an_auxiliary_task_only_degrades_readiness() {
        let mut s = Supervisor::new();
        let st = s.stage("background");
        s.spawn(st, "bootstrap server", Policy::Auxiliary, async {
            Err::<(), _>("accept failed")
        });
        s.spawn(st, "registry", Policy::Essential, forever(s.stop_token(st)));
        let health = s.health();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(s.run(shutdown.clone()));
        for _ in 0..100 {
            if !health.degraded().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            health.degraded(),
            ["the bootstrap server task, which stopped: accept failed"]
        );
        assert!(health.check().is_ok());
        shutdown.cancel();
        run.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn stages_stop_in_order() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut s = Supervisor::new();
        for name in ["serving", "background", "status"] {
            let st = s.stage(name);
            let (stop, order) = (s.stop_token(st), order.clone());
            s.spawn_infallible(st, name, Policy::Essential, async move {
                stop.cancelled().await;
                // A stage that takes a while must still finish before the next one.
                tokio::time::sleep(Duration::from_millis(20)).await;
                order.lock().expect("lock").push(name);
            });
        }
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        s.run(shutdown).await.expect("clean stop");
        assert_eq!(
            *order.lock().expect("lock"),
            ["serving", "background", "status"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_that_hangs_is_aborted_after_its_grace() {
        let mut s = Supervisor::new();
        let st = s.stage("stuck");
        let later = s.stage("later");
        let ran = Arc::new(AtomicUsize::new(0));
        s.spawn_infallible(st, "stuck", Policy::Essential, std::future::pending());
        let (stop, r) = (s.stop_token(later), ran.clone());
        s.spawn_infallible(later, "later", Policy::Essential, async move {
            stop.cancelled().await;
            r.fetch_add(1, Ordering::Relaxed);
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        s.run(shutdown).await.expect("stops");
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }
}
