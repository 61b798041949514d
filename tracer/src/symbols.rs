//! Modules (loaded ELF files) of a process and their function symbols at runtime addresses (goblin).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use goblin::elf::program_header::PT_LOAD;
use goblin::elf::sym::STT_FUNC;
use goblin::elf::Elf;
use nix::unistd::Pid;

use crate::maps::{read_maps, Mapping};
use crate::{Addr, TracerError};

/// A function symbol at absolute runtime addresses `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub start: Addr,
    pub end: Addr,
}

/// One loaded ELF file (executable or shared library).
#[derive(Debug, Clone)]
pub struct Module {
    pub path: PathBuf,
    /// Load bias: runtime address = ELF virtual address + base (0 for non-PIE executables).
    pub base: Addr,
    /// Lowest and highest addresses mapped from this file.
    pub start: Addr,
    pub end: Addr,
    /// FUNC symbols from .symtab and .dynsym, and the functions `.eh_frame` knows that no symbol covers (named
    /// `file+0xVADDR`), sorted by start.
    pub symbols: Vec<Symbol>,
}

impl Module {
    /// The symbol containing `a`, if any.
    pub fn symbol_at(&self, a: Addr) -> Option<&Symbol> {
        let i = self.symbols.partition_point(|s| s.start <= a);
        let s = self.symbols.get(i.checked_sub(1)?)?;
        (a < s.end).then_some(s)
    }

    /// The symbol with this exact name, if any.
    pub fn symbol(&self, name: &str) -> Option<&Symbol> {
        self.symbols.iter().find(|s| s.name == name)
    }
}

/// What is kept of a parsed ELF file, independent of where it is loaded.
#[derive(Debug, Default)]
struct Parsed {
    /// (name, vaddr, size) of FUNC symbols, sorted by vaddr, de-duplicated by address.
    syms: Vec<(String, u64, u64)>,
    /// (file offset, vaddr) of PT_LOAD segments, both page-aligned down.
    loads: Vec<(u64, u64)>,
}

type Cache = Mutex<HashMap<(PathBuf, u64), Arc<Parsed>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

const PAGE_MASK: u64 = !(crate::addr::PAGE_SIZE - 1);

/// Parse an ELF image; anything malformed gives an empty result (a parser panic on hostile input included).
fn parse(bytes: &[u8]) -> Parsed {
    std::panic::catch_unwind(|| parse_inner(bytes)).unwrap_or_default()
}

fn parse_inner(bytes: &[u8]) -> Parsed {
    let Ok(elf) = Elf::parse(bytes) else {
        return Parsed::default();
    };
    let loads = elf
        .program_headers
        .iter()
        .filter(|ph| ph.p_type == PT_LOAD)
        .map(|ph| (ph.p_offset & PAGE_MASK, ph.p_vaddr & PAGE_MASK))
        .collect();
    let mut syms: Vec<(String, u64, u64)> = Vec::new();
    for (tab, strtab) in [(&elf.syms, &elf.strtab), (&elf.dynsyms, &elf.dynstrtab)] {
        for s in tab.iter() {
            if s.st_type() != STT_FUNC || s.st_value == 0 || s.st_shndx == 0 {
                continue;
            }
            let Some(name) = strtab.get_at(s.st_name) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            syms.push((name.to_string(), s.st_value, s.st_size));
        }
    }
    // One symbol per address: prefer a sized one, then the shortest (non-versioned, non-alias-ish) name.
    syms.sort_by(|a, b| {
        a.1.cmp(&b.1)
            .then((b.2 > 0).cmp(&(a.2 > 0)))
            .then(a.0.starts_with('_').cmp(&b.0.starts_with('_')))
            .then(a.0.len().cmp(&b.0.len()))
    });
    syms.dedup_by_key(|s| s.1);
    let functions = eh_frame_functions(&elf, bytes);
    Parsed {
        syms: with_unnamed_functions(syms, &functions),
        loads,
    }
}

/// Function ranges `(vaddr, size)` from the file's `.eh_frame` (every function gcc and clang compile with
/// unwind tables, the default on x86-64, has an FDE, stripped or not), sorted by address. Empty when the section
/// is missing or malformed.
fn eh_frame_functions(elf: &Elf, bytes: &[u8]) -> Vec<(u64, u64)> {
    use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection};
    let Some(sh) = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(".eh_frame"))
    else {
        return Vec::new();
    };
    let (off, len) = (sh.sh_offset as usize, sh.sh_size as usize);
    let Some(data) = off.checked_add(len).and_then(|end| bytes.get(off..end)) else {
        return Vec::new();
    };
    let section = EhFrame::new(data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(sh.sh_addr);
    if let Some(text) = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".text"))
    {
        bases = bases.set_text(text.sh_addr);
    }
    let mut out = Vec::new();
    let mut entries = section.entries(&bases);
    // A malformed entry ends the walk: what was read so far is kept.
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(EhFrame::cie_from_offset) {
                if fde.len() > 0 && fde.initial_address() != 0 {
                    out.push((fde.initial_address(), fde.len()));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup_by_key(|f| f.0);
    out
}

/// `syms` plus a symbol for every function of `functions` that no sized symbol covers, named after its address
/// in the file (`+0xVADDR`; [`modules`] prefixes the file name), so stripped code is seen as whole functions.
fn with_unnamed_functions(
    mut syms: Vec<(String, u64, u64)>,
    functions: &[(u64, u64)],
) -> Vec<(String, u64, u64)> {
    let named: Vec<(u64, u64)> = syms.iter().map(|s| (s.1, s.1 + s.2.max(1))).collect();
    for &(start, size) in functions {
        let i = named.partition_point(|n| n.0 <= start);
        let covered = i > 0 && start < named[i - 1].1;
        if !covered {
            syms.push((format!("+{start:#x}"), start, size));
        }
    }
    syms.sort_by_key(|s| s.1);
    syms
}

/// The bytes of the file at `path`, mapped read-only: reading a 4 MB shared library into a fresh buffer (its
/// pages zeroed, then copied into) was 40% of dynspec's start-up; a mapping shares the page cache's pages.
fn map_file_bytes(path: &Path) -> Option<memmap2::Mmap> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: the mapping is private and read-only, used only to parse the file right here, and dropped before
    // `load` returns. A file truncated meanwhile by another process would fault the reads (SIGBUS); ELF files
    // mapped by a running program are replaced by rename, not rewritten in place.
    unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.ok()
}

fn load(pid: Pid, path: &Path, inode: u64, first: &Mapping) -> Arc<Parsed> {
    let key = (path.to_path_buf(), inode);
    if let Ok(c) = cache().lock() {
        if let Some(p) = c.get(&key) {
            return p.clone();
        }
    }
    // The target may live in another mount namespace: read through its root first.
    let rooted =
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    // A deleted or replaced file is still readable through the mapping itself.
    let map_file = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        first.start.0, first.end.0
    );
    let bytes = map_file_bytes(Path::new(&map_file))
        .or_else(|| map_file_bytes(&rooted))
        .or_else(|| map_file_bytes(path));
    let parsed = Arc::new(parse(bytes.as_deref().unwrap_or(&[])));
    if let Ok(mut c) = cache().lock() {
        c.insert(key, parsed.clone());
    }
    parsed
}

/// Compute the load bias of a file from its mappings and PT_LOAD segments.
fn load_bias(parsed: &Parsed, maps: &[&Mapping]) -> Option<u64> {
    for m in maps {
        if let Some((_, vaddr)) = parsed.loads.iter().find(|(off, _)| *off == m.offset) {
            return Some(m.start.0.wrapping_sub(*vaddr));
        }
    }
    None
}

/// The modules of `pid`: one per file that has an executable mapping. Stripped files give empty symbol lists.
pub fn modules(pid: Pid) -> Result<Vec<Module>, TracerError> {
    let maps = read_maps(pid)?;
    let mut keys: Vec<(PathBuf, u64)> = Vec::new();
    for m in &maps {
        if m.exec && m.is_file() && !m.is_pseudo() {
            let key = (m.path.clone().unwrap_or_default(), m.inode);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let mut out = Vec::new();
    for (path, inode) in keys {
        let mine: Vec<&Mapping> = maps
            .iter()
            .filter(|m| m.inode == inode && m.path.as_deref() == Some(path.as_path()))
            .collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else {
            continue;
        };
        let parsed = load(pid, &path, inode, first);
        let bias =
            load_bias(&parsed, &mine).unwrap_or_else(|| first.start.0.wrapping_sub(first.offset));
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let symbols = parsed
            .syms
            .iter()
            .enumerate()
            .map(|(i, (name, vaddr, size))| {
                let start = vaddr.wrapping_add(bias);
                let end = if *size > 0 {
                    start.wrapping_add(*size)
                } else {
                    // Unsized symbols extend to the next symbol (or the module end).
                    parsed
                        .syms
                        .get(i + 1)
                        .map(|n| n.1.wrapping_add(bias))
                        .unwrap_or(last.end.0)
                        .max(start.saturating_add(1))
                };
                Symbol {
                    // An unnamed function (from .eh_frame) is named `file+0xVADDR`: `objdump -d
                    // --start-address=0xVADDR file` lands on it.
                    name: if name.starts_with('+') {
                        format!("{file}{name}")
                    } else {
                        name.clone()
                    },
                    start: Addr(start),
                    end: Addr(end),
                }
            })
            .collect();
        out.push(Module {
            path,
            base: Addr(bias),
            start: first.start,
            end: last.end,
            symbols,
        });
    }
    if let Some(vdso) = vdso_module(pid, &maps) {
        out.push(vdso);
    }
    out.sort_by_key(|m| m.start);
    Ok(out)
}

/// The vDSO as a module: its ELF image is read from the target's memory (it has no file).
fn vdso_module(pid: Pid, maps: &[Mapping]) -> Option<Module> {
    let m = maps
        .iter()
        .find(|m| m.path.as_deref() == Some(Path::new("[vdso]")))?;
    let len = m.end.0.checked_sub(m.start.0)?;
    if len == 0 || len > 1 << 24 {
        return None;
    }
    let key = (PathBuf::from("[vdso]"), len);
    let cached = cache().lock().ok().and_then(|c| c.get(&key).cloned());
    let parsed = match cached {
        Some(p) => p,
        None => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
            let mut bytes = vec![0u8; len as usize];
            f.read_exact_at(&mut bytes, m.start.0).ok()?;
            let p = Arc::new(parse(&bytes));
            if let Ok(mut c) = cache().lock() {
                c.insert(key, p.clone());
            }
            p
        }
    };
    // The vDSO is linked at (or near) 0 and mapped whole: its first PT_LOAD starts the mapping.
    let bias = m
        .start
        .0
        .wrapping_sub(parsed.loads.first().map_or(0, |l| l.1));
    let symbols = parsed
        .syms
        .iter()
        .map(|(name, vaddr, size)| {
            let start = vaddr.wrapping_add(bias);
            Symbol {
                name: name.clone(),
                start: Addr(start),
                end: Addr(start.wrapping_add((*size).max(1))),
            }
        })
        .collect();
    Some(Module {
        path: PathBuf::from("[vdso]"),
        base: Addr(bias),
        start: m.start,
        end: m.end,
        symbols,
    })
}

/// The module containing `a`, and the function symbol containing it if known.
pub fn symbolize(modules: &[Module], a: Addr) -> Option<(&Module, Option<&Symbol>)> {
    let m = modules.iter().find(|m| m.start <= a && a < m.end)?;
    Some((m, m.symbol_at(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_without_symbols_come_from_eh_frame() {
        let syms = vec![("named".to_string(), 0x1000, 0x40)];
        // One FDE is the named function itself, one lies inside it (a nested FDE), two are unnamed.
        let fdes = [
            (0x1000, 0x40),
            (0x1010, 0x8),
            (0x1040, 0x20),
            (0x2000, 0x100),
        ];
        assert_eq!(
            with_unnamed_functions(syms, &fdes),
            vec![
                ("named".to_string(), 0x1000, 0x40),
                ("+0x1040".to_string(), 0x1040, 0x20),
                ("+0x2000".to_string(), 0x2000, 0x100),
            ]
        );
        // A real file: its FDEs start where its function symbols do.
        let Ok(real) = std::fs::read("/proc/self/exe") else {
            return;
        };
        let Ok(elf) = Elf::parse(&real) else { return };
        let fdes = eh_frame_functions(&elf, &real);
        assert!(fdes.len() > 100, "{} FDEs", fdes.len());
        let starts: std::collections::HashSet<u64> = elf
            .syms
            .iter()
            .filter(|s| s.st_type() == STT_FUNC)
            .map(|s| s.st_value)
            .collect();
        let matching = fdes.iter().filter(|f| starts.contains(&f.0)).count();
        assert!(
            matching * 10 >= fdes.len() * 9,
            "{matching} of {} FDEs start at a symbol",
            fdes.len()
        );
    }

    #[test]
    fn malformed_elf_gives_no_symbols_and_no_panic() {
        assert!(parse(b"").syms.is_empty());
        assert!(parse(b"\x7fELF\x02\x01\x01").syms.is_empty());
        let Ok(real) = std::fs::read("/proc/self/exe") else {
            return;
        };
        let whole = parse(&real);
        assert!(!whole.loads.is_empty());
        // Truncations and byte flips of a real ELF.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = real[..(seed as usize % real.len().min(1 << 16)).max(1)].to_vec();
            if i % 2 == 0 {
                let at = (seed >> 20) as usize % b.len();
                b[at] ^= 0xff;
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn symbol_lookup() {
        let m = Module {
            path: PathBuf::from("/x"),
            base: Addr(0x1000),
            start: Addr(0x1000),
            end: Addr(0x3000),
            symbols: vec![
                Symbol {
                    name: "a".into(),
                    start: Addr(0x1100),
                    end: Addr(0x1200),
                },
                Symbol {
                    name: "b".into(),
                    start: Addr(0x1300),
                    end: Addr(0x1310),
                },
            ],
        };
        assert_eq!(m.symbol_at(Addr(0x1100)).unwrap().name, "a");
        assert_eq!(m.symbol_at(Addr(0x11ff)).unwrap().name, "a");
        assert!(m.symbol_at(Addr(0x1200)).is_none());
        assert!(m.symbol_at(Addr(0x10ff)).is_none());
        assert_eq!(m.symbol("b").unwrap().start, Addr(0x1300));
        let mods = vec![m];
        assert!(symbolize(&mods, Addr(0x2fff)).is_some_and(|(_, s)| s.is_none()));
        assert!(symbolize(&mods, Addr(0x3000)).is_none());
    }
}
