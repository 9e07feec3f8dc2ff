//! One dedicated OS thread per target namespace (DESIGN §3): it enters the namespace once and
//! runs every job for that target — netlink, exec of nft/iptables, sysctl writes — in order.
//! Never tokio's pooled threads, whose namespace is not ours to change.

use std::sync::mpsc;

use crate::netns::{NetnsError, Target};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Handle to a target's worker thread. Jobs run one at a time, in submission order.
#[derive(Debug, Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
}

/// The worker thread is gone (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("the worker thread of this target is gone")]
pub struct WorkerGone;

impl Worker {
    /// Starts the thread and waits until it has entered `target`.
    pub fn spawn(target: Target, name: String) -> Result<Worker, NetnsError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let entered = target.enter_current_thread();
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }
        });
        if let Err(e) = spawned {
            return Err(NetnsError::Open { path: "worker thread".into(), source: e });
        }
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { tx }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::Panicked("worker thread".into())),
        }
    }

    /// Runs `f` on the worker thread (inside the target) and awaits its result.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, WorkerGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| WorkerGone)?;
        rx.await.map_err(|_| WorkerGone)
    }
}
