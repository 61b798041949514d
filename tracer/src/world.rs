//! The stopped world: a value that proves every thread of the traced processes is stopped, and resumes them
//! when it goes away.
//!
//! Patching code, unlinking variants and moving threads are only sound while no thread runs
//! (ARCHITECTURE.md invariant 6). Operations that need that take a `&mut Stopped` rather than a `&mut Tracer`,
//! so the requirement is checked by the compiler, and no early return can forget to resume the program.

use std::ops::{Deref, DerefMut};

use crate::{Tracer, TracerError};

/// Every thread of every traced process is stopped (a thread blocked in `vfork` counts: it reports a
/// ptrace-stop before it runs user code again) for as long as this value lives. Dropping it resumes them all,
/// ignoring errors; [`Stopped::resume`] reports them.
///
/// It derefs to the [`Tracer`], so registers, memory and remote system calls are reachable through it. Tracer
/// calls that resume a thread for a moment (remote system calls) stop it again before they return.
#[must_use = "dropping the stopped world resumes every thread at once"]
pub struct Stopped<'t> {
    tracer: &'t mut Tracer,
    /// Resume the threads on drop (false once resumed, or when the caller keeps them stopped).
    resume_on_drop: bool,
}

impl Tracer {
    /// Stop every thread of every traced process and return the proof. Events seen while stopping are queued
    /// for `next_event`.
    pub fn stop_world(&mut self) -> Result<Stopped<'_>, TracerError> {
        self.stop_all()?;
        Ok(Stopped {
            tracer: self,
            resume_on_drop: true,
        })
    }
}

impl Stopped<'_> {
    /// Resume every thread now, reporting failure.
    pub fn resume(mut self) -> Result<(), TracerError> {
        self.resume_on_drop = false;
        self.tracer.resume_all()
    }

    /// Give the proof up without resuming: the caller goes on with the threads stopped (to detach, or to do
    /// more work that needs them stopped) and resumes them itself later with `Tracer::resume_all`.
    pub fn keep_stopped(mut self) {
        self.resume_on_drop = false;
    }
}

impl Deref for Stopped<'_> {
    type Target = Tracer;

    fn deref(&self) -> &Tracer {
        self.tracer
    }
}

impl DerefMut for Stopped<'_> {
    fn deref_mut(&mut self) -> &mut Tracer {
        self.tracer
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if self.resume_on_drop {
            // Errors here (a thread that vanished) are reported by the next event; the program must go on.
            let _ = self.tracer.resume_all();
        }
    }
}
