//! Build a sample C file as a shared library, load it in-process and find its functions (address and size), for differential tests and benchmarks.

use super::{ExecBuf, SelfMemory};
use specializer::{Addr, Encoded, Gpr, KnownState, Options, Request, Variant};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A sample compiled with `gcc -O2 -DDYNSPEC_NO_MAIN -shared -fPIC` and dlopen'ed.
pub struct SampleLib {
    pub path: PathBuf,
    lib: libloading::Library,
    /// Symbol table from `nm -S`: name -> (offset in the file, size).
    syms: Vec<(String, u64, u64)>,
    _dir: TempDir,
}

/// A directory removed on drop (the `tempfile` crate's).
pub type TempDir = tempfile::TempDir;

/// A fresh temporary directory named after `tag`.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("dynspec-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

/// The repository's samples/ directory.
pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples")
}

impl SampleLib {
    /// Compile `samples/<name>.c` and load it.
    pub fn build(name: &str) -> SampleLib {
        let dir = temp_dir(name);
        let src = samples_dir().join(format!("{name}.c"));
        let path = dir.path().join(format!("lib{name}.so"));
        let out = Command::new("gcc")
            .args(["-O2", "-DDYNSPEC_NO_MAIN", "-shared", "-fPIC", "-o"])
            .arg(&path)
            .arg(&src)
            .output()
            .expect("run gcc");
        assert!(
            out.status.success(),
            "gcc failed on {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let nm = Command::new("nm")
            .args(["-S", "--defined-only"])
            .arg(&path)
            .output()
            .expect("run nm");
        assert!(nm.status.success(), "nm failed");
        let syms = String::from_utf8_lossy(&nm.stdout)
            .lines()
            .filter_map(|l| {
                let p: Vec<&str> = l.split_whitespace().collect();
                if p.len() != 4 {
                    return None;
                }
                Some((
                    p[3].to_string(),
                    u64::from_str_radix(p[0], 16).ok()?,
                    u64::from_str_radix(p[1], 16).ok()?,
                ))
            })
            .collect();
        // SAFETY: loading a library we just compiled from the repository's sample sources;
        // its initializers are the C runtime's.
        let lib = unsafe { libloading::Library::new(&path) }.expect("dlopen sample");
        SampleLib {
            path,
            lib,
            syms,
            _dir: dir,
        }
    }

    /// Runtime address and size of a function.
    pub fn function(&self, name: &str) -> (Addr, u64) {
        let (_, off, size) = self
            .syms
            .iter()
            .find(|s| s.0 == name)
            .unwrap_or_else(|| panic!("{name} not in the symbol table"));
        let addr = self.raw_symbol(name);
        let _ = off;
        (Addr(addr), *size)
    }

    /// Runtime address of any symbol.
    pub fn raw_symbol(&self, name: &str) -> u64 {
        let cname = format!("{name}\0");
        // SAFETY: we only take the symbol's address, typed as a pointer.
        let s: libloading::Symbol<*const u8> =
            unsafe { self.lib.get(cname.as_bytes()) }.expect("dlsym");
        *s as u64
    }

    /// A function pointer of type `F` for a symbol.
    ///
    /// # Safety
    /// `F` must be the symbol's real C type.
    pub unsafe fn func<F: Copy>(&self, name: &str) -> F {
        let cname = format!("{name}\0");
        // SAFETY: the caller guarantees the type.
        let s: libloading::Symbol<F> = unsafe { self.lib.get(cname.as_bytes()) }.expect("dlsym");
        *s
    }

    /// A memory view of this process where the library's read-only mappings
    /// and the given ranges are constant.
    pub fn memory(&self, constant: &[(u64, u64)]) -> SelfMemory {
        let mut m = SelfMemory::new();
        let name = self.path.file_name().unwrap().to_string_lossy().to_string();
        let n = m.add_constant_file_mappings(&name);
        assert!(n > 0, "no read-only mappings of {name} found");
        for (s, e) in constant {
            m.add_constant(*s, *e);
        }
        m
    }
}

/// A specialized function ready to call.
pub struct Specialized {
    pub variant: Variant,
    pub encoded: Encoded,
    pub buf: ExecBuf,
}

impl Specialized {
    pub fn addr(&self) -> u64 {
        self.buf.addr()
    }

    /// A function pointer to the variant.
    ///
    /// # Safety
    /// `F` must be the original function's type.
    pub unsafe fn func<F: Copy>(&self) -> F {
        assert_eq!(std::mem::size_of::<F>(), 8);
        // SAFETY: the variant is entered like the original function (same ABI); caller
        // guarantees the type.
        unsafe { std::mem::transmute_copy::<u64, F>(&self.addr()) }
    }
}

/// Specialize `func` (address, size) with `rdi` known, encode it into a fresh
/// executable buffer. Errors are returned as text for the caller's report.
pub fn specialize_function(
    func: (Addr, u64),
    rdi: u64,
    mem: &SelfMemory,
    options: Options,
) -> Result<Specialized, String> {
    let mut known = KnownState::default();
    known.set_reg(Gpr::Rdi, Some(rdi));
    let req = Request {
        entry: func.0,
        region_start: func.0,
        region_end: func.0.offset(func.1),
        known,
        options,
    };
    specialize_request(&req, mem)
}

/// Specialize `req` over `mem` and encode the variant into an executable buffer of its own.
#[allow(dead_code)] // not every test binary specializes mid-function
pub fn specialize_request(req: &Request, mem: &SelfMemory) -> Result<Specialized, String> {
    let variant = specializer::specialize(req, mem).map_err(|e| format!("specialize: {e}"))?;
    // Encode twice: once to learn the size, then at the buffer's real address.
    let probe = variant
        .encode(Addr(0x1000_0000))
        .map_err(|e| format!("encode: {e}"))?;
    let buf = ExecBuf::anywhere(probe.code.len() + 4096);
    let encoded = variant
        .encode(Addr(buf.addr()))
        .map_err(|e| format!("encode at the buffer: {e}"))?;
    if encoded.code.len() > buf.map.len {
        return Err(format!(
            "encoding grew from {} to {} bytes",
            probe.code.len(),
            encoded.code.len()
        ));
    }
    buf.write(0, &encoded.code);
    Ok(Specialized {
        variant,
        encoded,
        buf,
    })
}
