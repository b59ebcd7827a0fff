//! The raw `bpf(2)` commands aya 0.14 does not wrap: batch updates and lookups, and
//! lookup-and-delete.
use super::*;

/// `bpf(2)` command `BPF_MAP_LOOKUP_BATCH` (Linux 5.6; hash maps, LRU included).
pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
pub(crate) const LOOKUP_CHUNK: usize = 4096;

/// `bpf(cmd, attr, sizeof attr)`; returns the raw result (negative on error, see errno).
///
/// # Safety
///
/// `attr` must be the `union bpf_attr` member that `cmd` takes, and every pointer in it
/// valid for what the kernel reads or writes through it for the duration of the call.
pub(crate) unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> libc::c_long {
    // SAFETY: upheld by the caller.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    }
}

/// `bpf(2)` command `BPF_MAP_UPDATE_BATCH` (Linux 5.6).
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `bpf(2)` command `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
pub(crate) const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// Map update flag: only create, never replace.
pub(crate) const BPF_NOEXIST: u64 = 1;

/// The element-command member of `union bpf_attr` (lookup, update, delete).
#[repr(C)]
#[derive(Default)]
pub(crate) struct ElemAttr {
    pub(crate) map_fd: u32,
    pub(crate) _pad: u32,
    pub(crate) key: u64,
    pub(crate) value: u64,
    pub(crate) flags: u64,
}

/// `ENOTSUPP`, the kernel-internal "operation not supported" `bpf(2)` may return.
pub(crate) const ENOTSUPP: i32 = 524;
/// Entries per `BPF_MAP_UPDATE_BATCH` call.
pub(crate) const BATCH_CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    pub(crate) in_batch: u64,
    pub(crate) out_batch: u64,
    pub(crate) keys: u64,
    pub(crate) values: u64,
    pub(crate) count: u32,
    pub(crate) map_fd: u32,
    pub(crate) elem_flags: u64,
    pub(crate) flags: u64,
}

pub(crate) fn lookup_batch(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    f: &mut impl FnMut(&FlowKey, &FlowValue),
) -> std::io::Result<()> {
    let fd = flows.map().fd().as_fd().as_raw_fd();
    let mut keys = vec![FlowKey::default(); LOOKUP_CHUNK];
    let mut values = vec![FlowValue::default(); LOOKUP_CHUNK];
    // The hash map's batch token: a bucket index.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of its own size; `keys` and `values`
        // hold `count` map keys and values and outlive the call; the tokens are u32.
        let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let got = attr.count as usize;
        match error.as_ref().and_then(|e| e.raw_os_error()) {
            None | Some(libc::ENOENT) => {
                for (k, v) in keys[..got].iter().zip(&values[..got]) {
                    f(k, v);
                }
            }
            _ => return Err(error.expect("an error")),
        }
        if error.is_some() {
            // ENOENT: that was the last batch.
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Removes one flow entry and returns what it held, in one step
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux 5.14 for hash maps).
pub(crate) fn take_flow(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    key: &FlowKey,
) -> std::io::Result<Option<FlowValue>> {
    let fd = flows.map().fd().as_fd().as_raw_fd();
    let mut value = std::mem::MaybeUninit::<FlowValue>::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key as *const FlowKey as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` element command of its own size; `key` and
    // `value` are the map's key and value types and outlive the call; the kernel reads the
    // key and writes the value.
    let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled the value (a plain `repr(C)` struct of integers).
    Ok(Some(unsafe { value.assume_init() }))
}
