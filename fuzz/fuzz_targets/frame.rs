//! The protocol decoder (frame header, size limit, JSON) must reject any
//! malformed input with an error, never panic, and never allocate past the
//! frame limit.
#![no_main]
use dask_spank_common::frame::{decode_frame, encode, read_frame};
use dask_spank_common::messages::{Hello, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_frame::<Request>(data) {
        // Whatever decodes re-encodes to something that decodes the same.
        let again = encode(&req).expect("encode");
        assert_eq!(decode_frame::<Request>(&again).expect("decode"), req);
    }
    let _ = decode_frame::<Response>(data);
    let _ = decode_frame::<Hello>(data);
    let mut r = data;
    while read_frame::<_, Request>(&mut r).is_ok() {}
});
