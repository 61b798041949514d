//! The target's code as the profiler sees it: symbols and mappings cached per process, and code bytes read from
//! the live process (or from the mapped file once it is gone).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tracer::maps::{mapping_at, read_maps, Mapping};
use tracer::symbols::{modules, symbolize, Module};
use tracer::{Addr, Tracer};

use crate::profile::{Location, ProfileEnv};

/// Module lists are re-read at most this often per process when an address is not found in them.
const MODULE_REFRESH: Duration = Duration::from_millis(10);

/// Symbols and mappings of the target, cached per process and refreshed when an address is not covered.
#[derive(Default)]
pub struct CodeMap {
    modules: HashMap<Pid, (Vec<Module>, Instant)>,
    maps: HashMap<Pid, (Vec<Mapping>, Instant)>,
}

impl CodeMap {
    pub fn forget(&mut self, pid: Pid) {
        self.modules.remove(&pid);
        self.maps.remove(&pid);
    }

    /// Re-read the modules of `pid`; if that fails (the process is gone) keep what we had.
    fn refresh_modules(&mut self, pid: Pid) {
        match modules(pid) {
            Ok(mods) => {
                self.modules.insert(pid, (mods, Instant::now()));
            }
            Err(_) => {
                self.modules
                    .entry(pid)
                    .or_insert_with(|| (Vec::new(), Instant::now()))
                    .1 = Instant::now();
            }
        }
    }

    /// Re-read the mappings of `pid`; if that fails keep what we had.
    fn refresh_maps(&mut self, pid: Pid) {
        match read_maps(pid) {
            Ok(maps) => {
                self.maps.insert(pid, (maps, Instant::now()));
            }
            Err(_) => {
                self.maps
                    .entry(pid)
                    .or_insert_with(|| (Vec::new(), Instant::now()))
                    .1 = Instant::now();
            }
        }
    }

    /// Read symbols and mappings now, while the process is stopped and alive: a short-lived program may be gone
    /// before its first samples are analysed.
    pub fn preload(&mut self, pid: Pid) {
        self.refresh_modules(pid);
        self.refresh_maps(pid);
    }
}

/// [`ProfileEnv`] over the live target.
pub struct LiveEnv<'a> {
    pub tracer: &'a Tracer,
    pub code: &'a mut CodeMap,
}

impl LiveEnv<'_> {
    fn ensure_modules(&mut self, pid: Pid, a: Addr) {
        let stale = match self.code.modules.get(&pid) {
            None => true,
            Some((mods, at)) => symbolize(mods, a).is_none() && at.elapsed() >= MODULE_REFRESH,
        };
        if stale {
            self.code.refresh_modules(pid);
        }
    }

    fn ensure_maps(&mut self, pid: Pid, a: Addr) {
        let stale = match self.code.maps.get(&pid) {
            None => true,
            Some((maps, at)) => mapping_at(maps, a).is_none() && at.elapsed() >= MODULE_REFRESH,
        };
        if stale {
            self.code.refresh_maps(pid);
        }
    }

    /// Code of a process that is gone (or memory we cannot read): the bytes of a read-only file mapping are the
    /// file's bytes at the mapping's offset.
    fn read_from_file(&mut self, pid: Pid, addr: Addr, buf: &mut [u8]) -> usize {
        use std::os::unix::fs::FileExt as _;
        let Some((maps, _)) = self.code.maps.get(&pid) else {
            return 0;
        };
        let Some(m) = mapping_at(maps, addr) else {
            return 0;
        };
        if m.write || !m.is_file() || m.is_pseudo() {
            return 0;
        }
        let Some(path) = &m.path else { return 0 };
        let avail = (m.end.0 - addr.0).min(buf.len() as u64) as usize;
        let off = m.offset + (addr.0 - m.start.0);
        let Ok(f) = std::fs::File::open(path) else {
            return 0;
        };
        let mut done = 0;
        while done < avail {
            match f.read_at(&mut buf[done..avail], off + done as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }
}

impl ProfileEnv for LiveEnv<'_> {
    fn locate(&mut self, pid: Pid, ip: Addr) -> Location {
        self.ensure_modules(pid, ip);
        if let Some((mods, _)) = self.code.modules.get(&pid) {
            if let Some((m, sym)) = symbolize(mods, ip) {
                let module = m.path.display().to_string();
                return match sym {
                    Some(s) => Location::Symbol {
                        module,
                        name: s.name.clone(),
                        start: s.start,
                        end: if s.end > s.start {
                            s.end
                        } else {
                            s.start.offset(1)
                        },
                    },
                    None => Location::Unsymbolized {
                        module,
                        start: m.start,
                        end: m.end,
                    },
                };
            }
        }
        self.ensure_maps(pid, ip);
        if let Some((maps, _)) = self.code.maps.get(&pid) {
            if let Some(m) = mapping_at(maps, ip) {
                let module = match &m.path {
                    Some(p) => p.display().to_string(),
                    None => "[anon]".to_string(),
                };
                return Location::Unsymbolized {
                    module,
                    start: m.start,
                    end: m.end,
                };
            }
        }
        Location::Unknown
    }

    fn read_code(&mut self, pid: Pid, addr: Addr, buf: &mut [u8]) -> usize {
        if self.tracer.read_memory(pid, addr, buf).is_ok() {
            return buf.len();
        }
        // Part of the range is unmapped (an instruction right before a guard page, a symbol size that runs past
        // the mapping): read page by page and keep the readable prefix.
        let page = tracer::addr::PAGE_SIZE as usize;
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr.offset(done as u64);
            let chunk = (page - (at.0 as usize % page)).min(buf.len() - done);
            if self
                .tracer
                .read_memory(pid, at, &mut buf[done..done + chunk])
                .is_err()
            {
                break;
            }
            done += chunk;
        }
        if done == 0 {
            return self.read_from_file(pid, addr, buf);
        }
        done
    }
}
