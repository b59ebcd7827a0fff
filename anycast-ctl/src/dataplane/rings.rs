//! Consistent-hash tables in `RINGS`: what a table is built from, its two halves (one live,
//! one written), and how entries reach the kernel.
use super::bpf_sys::{sys_bpf, BatchAttr, BATCH_CHUNK, BPF_MAP_UPDATE_BATCH, ENOTSUPP};
use super::*;

/// `RINGS`, written through a shared memory mapping of the map (plain stores: a whole
/// 65537-entry table in tens of microseconds, where map updates take milliseconds), else
/// with `BPF_MAP_UPDATE_BATCH` where the kernel takes it, else one update per entry.
pub(crate) struct Rings {
    map: Array<MapData, u32>,
    /// The map's values, mapped into our memory (an array map's values are 8 bytes apart).
    pub(crate) mapped: Option<MappedArray>,
    /// False once the kernel refused a batch update.
    pub(crate) batch: bool,
}

/// A shared mapping of a `BPF_F_MMAPABLE` array map's values.
pub(crate) struct MappedArray {
    base: *mut u8,
    len: usize,
    entries: u32,
}

/// An array map's value stride: value sizes are rounded up to 8 bytes.
pub(crate) const ARRAY_STRIDE: usize = 8;

impl MappedArray {
    pub(crate) fn new(map: &Array<MapData, u32>) -> std::io::Result<Self> {
        let entries = map.len();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * ARRAY_STRIDE).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks size and flags.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedArray {
            base: base as *mut u8,
            len,
            entries,
        })
    }

    pub(crate) fn write(&self, entries: impl Iterator<Item = (u32, u32)>) -> Result<(), MapError> {
        for (i, v) in entries {
            if i >= self.entries {
                return Err(MapError::OutOfBounds {
                    index: i,
                    max_entries: self.entries,
                });
            }
            // SAFETY: in bounds of the mapping, 4-aligned; the data path reads each entry
            // as one 32-bit load, so a 32-bit store is never seen half-written.
            unsafe {
                (self.base.add(i as usize * ARRAY_STRIDE) as *const std::sync::atomic::AtomicU32)
                    .as_ref()
                    .expect("mapped")
                    .store(v, std::sync::atomic::Ordering::Relaxed)
            };
        }
        // Every entry is stored before the caller switches the service to the table.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

impl Rings {
    pub(crate) fn new(map: Array<MapData, u32>) -> Self {
        let mapped = match MappedArray::new(&map) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::debug!("RINGS cannot be memory-mapped ({e}); writing it by map updates");
                None
            }
        };
        Rings {
            map,
            mapped,
            batch: true,
        }
    }

    /// Writes a table's entries.
    pub(crate) fn write_table(&mut self, w: &TableWrite) -> Result<(), MapError> {
        if let Some(m) = &self.mapped {
            return m.write(w.entries());
        }
        let (indices, values): (Vec<u32>, Vec<u32>) = w.entries().unzip();
        self.write(&indices, &values)
    }

    /// Sets `map[indices[i]] = values[i]` for every i.
    pub(crate) fn write(&mut self, indices: &[u32], values: &[u32]) -> Result<(), MapError> {
        debug_assert_eq!(indices.len(), values.len());
        if let Some(m) = &self.mapped {
            return m.write(indices.iter().copied().zip(values.iter().copied()));
        }
        for (keys, vals) in indices.chunks(BATCH_CHUNK).zip(values.chunks(BATCH_CHUNK)) {
            if self.batch {
                match self.update_batch(keys, vals) {
                    Ok(()) => continue,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
                        ) =>
                    {
                        tracing::debug!(
                            "BPF_MAP_UPDATE_BATCH refused ({e}); writing tables entry by entry"
                        );
                        self.batch = false;
                    }
                    Err(io_error) => {
                        return Err(MapError::SyscallError(aya::sys::SyscallError {
                            call: "BPF_MAP_UPDATE_BATCH",
                            io_error,
                        }))
                    }
                }
            }
            // Entry by entry (the whole chunk again, if a batch stopped part-way: the writes
            // are idempotent).
            for (&k, &v) in keys.iter().zip(vals) {
                self.map.set(k, v, 0)?;
            }
        }
        Ok(())
    }

    pub(crate) fn update_batch(&self, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
        let fd = self.map.map().fd().as_fd().as_raw_fd();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of its own size; `keys` and `values`
        // hold `count` u32 keys and values (the map's key and value size) and outlive the
        // call; the kernel only reads them and writes `attr.count`.
        let rc = unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
