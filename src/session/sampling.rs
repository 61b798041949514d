//! Which threads the session samples: perf rings per thread, released with their process, paused while there
//! is nothing left to plan.

use std::collections::{BTreeSet, HashMap};

use nix::unistd::Pid;
use tracer::sampler::{Sample, Sampler, SamplerError};
use tracer::Tracer;

/// The sampler and the threads it samples.
pub(super) struct Sampling {
    sampler: Sampler,
    /// Sampled threads per process, to release their rings when the process exits.
    threads_of: HashMap<Pid, BTreeSet<Pid>>,
    /// Sampling is off (specializing, nothing left to plan) until [`Sampling::resume`].
    paused: bool,
    /// A thread could not be sampled and the user was told (once).
    warned: bool,
}

impl Sampling {
    pub(super) fn new(sampler: Sampler) -> Sampling {
        Sampling {
            sampler,
            threads_of: HashMap::new(),
            paused: false,
            warned: false,
        }
    }

    /// Sample `tid` of process `tgid`; a thread that is already gone is not an error.
    pub(super) fn add(&mut self, tid: Pid, tgid: Pid) -> Result<(), SamplerError> {
        match self.sampler.add_thread(tid) {
            Ok(()) => {
                self.threads_of.entry(tgid).or_default().insert(tid);
                Ok(())
            }
            Err(SamplerError::ThreadGone { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sample these threads (new ones, during the run) unless sampling is paused. Losing one thread's samples
    /// is not worth stopping the program for: the first failure is said once (unless `quiet`).
    pub(super) fn add_threads(&mut self, tracer: &Tracer, tids: &[Pid], quiet: bool) {
        if self.paused {
            return;
        }
        for &tid in tids {
            let tgid = tracer.tgid(tid).unwrap_or(tid);
            if let Err(e) = self.add(tid, tgid) {
                if !self.warned && !quiet {
                    eprintln!("dynspec: warning: cannot sample thread {tid}: {e}");
                }
                self.warned = true;
            }
        }
    }

    /// `tid` exited: release its ring.
    pub(super) fn thread_exited(&mut self, tid: Pid) {
        self.sampler.remove_thread(tid);
        for set in self.threads_of.values_mut() {
            set.remove(&tid);
        }
    }

    /// Process `pid` exited: release the rings (fds, memory) of its threads; fork-heavy programs would pile
    /// them up.
    pub(super) fn process_exited(&mut self, pid: Pid) {
        for tid in self.threads_of.remove(&pid).unwrap_or_default() {
            self.sampler.remove_thread(tid);
        }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stop sampling every thread. Samples still buffered are lost: take them first.
    pub(super) fn pause(&mut self) {
        for tid in self.sampler.threads() {
            self.sampler.remove_thread(tid);
        }
        self.paused = true;
    }

    /// Allow sampling again; the caller adds the threads.
    pub(super) fn unpause(&mut self) {
        self.paused = false;
    }

    pub(super) fn take_samples(&mut self) -> Vec<Sample> {
        self.sampler.take_samples()
    }

    pub(super) fn lost(&self) -> u64 {
        self.sampler.lost()
    }

    pub(super) fn rate_hz(&self) -> u64 {
        self.sampler.rate_hz()
    }
}
