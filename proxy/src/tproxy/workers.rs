//! The threads that serve TCP connections.
//!
//! Each worker is a thread with a current-thread tokio runtime and, per on-ip/on-port, a
//! listener socket of its own in a SO_REUSEPORT group. The kernel spreads new connections
//! over the group (by the 4-tuple's hash, or when the classifier's assigned socket is
//! consumed, in `skb_steal_sock`), and a connection's task lives on the worker that accepted
//! it: every wake-up of its relay comes from that worker's own epoll, with no hand-over to
//! another thread. With one multi-threaded runtime, idle workers were woken to steal the
//! task at each readiness event, which cost a cross-CPU wake-up per request.

use std::{io, sync::Arc, thread};

use crate::kernel_features::Feature;
use log::info;
use tokio::{net::TcpListener, runtime::Handle, sync::oneshot, task::JoinHandle};

use super::tcp::{self, ProxyOptions};

/// Running workers. Dropping them stops their runtimes, which closes whatever sockets
/// their tasks still hold.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Before 6.5, `bpf_sk_assign` refuses a SO_REUSEPORT listener (-ESOCKTNOSUPPORT): one
/// worker, with a plain listener, is all the classifier can use there.
fn reuseport_assign_supported() -> bool {
    Feature::ReuseportAssign.here()
}

/// How many workers `--workers` asks for: 0 is one per CPU where the kernel allows more
/// than one.
pub fn count(requested: u16) -> Result<usize, String> {
    let supported = reuseport_assign_supported();
    match requested {
        0 if supported => Ok(thread::available_parallelism().map_or(1, |n| n.get())),
        0 | 1 => Ok(1),
        n if supported => Ok(usize::from(n)),
        n => Err(format!(
            "--workers {n}: more than one worker needs Linux 6.5 or later (bpf_sk_assign of a \
             SO_REUSEPORT listener); use --workers 1"
        )),
    }
}

impl Workers {
    /// Starts `count` worker threads, each running an empty current-thread runtime.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = thread::Builder::new()
                .name(format!("proxy-tcp-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Runs the tasks spawned onto this runtime until told to stop; dropping
                    // the runtime then drops them.
                    let _ = runtime.block_on(stopped);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended before it started"))??;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        if count > 0 {
            info!("{count} TCP worker thread(s)");
        }
        Ok(Workers { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Serves the listener sockets of a group on the workers, one each in turn (one per
    /// worker, unless the group came from a previous agent with another worker count).
    /// The returned handles stop them: aborting an accept task closes its listener (which
    /// also takes it out of the sockmap) once its worker drops the task, which awaiting
    /// the handle waits for.
    pub fn serve(
        &self,
        listeners: Vec<std::net::TcpListener>,
        options: &Arc<ProxyOptions>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::with_capacity(listeners.len());
        for (worker, listener) in self.workers.iter().cycle().zip(listeners) {
            // Registers the socket with this worker's reactor.
            let registered = {
                let _entered = worker.handle.enter();
                TcpListener::from_std(listener)
            };
            let listener = match registered {
                Ok(listener) => listener,
                Err(e) => {
                    // All or nothing: no accept task left that nobody could stop.
                    tasks.iter().for_each(JoinHandle::abort);
                    return Err(e);
                }
            };
            let options = Arc::clone(options);
            let task = worker.handle.spawn(tcp::serve(listener, options));
            tasks.push(task);
        }
        Ok(tasks)
    }
}

impl Workers {
    /// Runs `task` on the workers in turn (`next` says whose turn it is): connections
    /// handed over by the previous agent, each resumed where its sockets register.
    pub fn spawn_on_next<F>(&self, next: &mut usize, task: F) -> Option<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let worker = self.workers.get(*next % self.workers.len().max(1))?;
        *next += 1;
        Some(worker.handle.spawn(task))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_always_possible() {
        assert_eq!(count(1), Ok(1));
    }

    #[test]
    fn zero_means_one_per_cpu_where_the_kernel_allows_it() {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let expected = if reuseport_assign_supported() {
            cpus
        } else {
            1
        };
        assert_eq!(count(0), Ok(expected));
    }

    #[test]
    fn workers_start_and_stop() {
        let workers = Workers::start(2).expect("starting workers");
        assert_eq!(workers.len(), 2);
        // Each worker runs what is spawned on it, on its own thread.
        let names: Vec<String> = workers
            .workers
            .iter()
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::channel();
                w.handle.spawn(async move {
                    let _ = tx.send(thread::current().name().unwrap_or("").to_owned());
                });
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("worker ran the task")
            })
            .collect();
        assert_eq!(names, ["proxy-tcp-0", "proxy-tcp-1"]);
        drop(workers);
    }
}
