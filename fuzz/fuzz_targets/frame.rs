//! The protocol decoder (frame header, size limit, JSON) must reject any
//! malformed input with an error, never panic, and never allocate past the
//! frame limit: a header may claim 4 GiB, the reader allocates at most
//! `MAX_FRAME` for the body, and decoding allocates in proportion to the
//! bytes that really arrived. A counting allocator checks it.
#![no_main]
use dask_spank_common::frame::{decode_frame, encode, read_frame, MAX_FRAME};
use dask_spank_common::messages::{Hello, Opening, Response, SessionRequest};
use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The largest single allocation since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records the requested sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Relaxed);
    // A stream of frames: however large the headers claim to be.
    let mut r = data;
    while read_frame::<_, Opening>(&mut r).is_ok() {}
    let bound = MAX_FRAME.max(32 * data.len() + 4096);
    let largest = LARGEST.load(Relaxed);
    assert!(
        largest <= bound,
        "reading {} bytes of frames allocated {largest} bytes at once (bound {bound})",
        data.len()
    );
    if let Ok(req) = decode_frame::<Opening>(data) {
        // Whatever decodes re-encodes to something that decodes the same.
        let again = encode(&req).expect("encode");
        assert_eq!(decode_frame::<Opening>(&again).expect("decode"), req);
    }
    let _ = decode_frame::<SessionRequest>(data);
    let _ = decode_frame::<Response>(data);
    let _ = decode_frame::<Hello>(data);
});
