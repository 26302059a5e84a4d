//! The plugstack.conf argument parser must return Ok or a one-line error
//! for any input, never panic.
#![no_main]
use dask_spank_common::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(text.split_whitespace()) {
        Ok(c) => {
            // Accepted configurations are consistent.
            let p = &c.policy;
            assert!(p.worker.cpus <= p.worker.cpus_max);
            assert!(p.worker.mem_mb <= p.worker.mem_max_mb);
            assert!(p.scheduler.time_s <= p.scheduler.time_max_s);
        }
        Err(e) => assert!(!e.to_string().contains('\n')),
    }
});
